"""Kubeflow Trainer v2 TrainJobs and the ClusterTrainingRuntimes trnft renders: the upstream CRDs they are
validated against, Trainer's webhook rules, and the pods Trainer makes of them (trnft.jobspecs.controllers)."""

from __future__ import annotations

import copy
import gzip
import hashlib
from pathlib import Path

import pytest
import yaml

from trnft.common import cli
from trnft.common.cluster.launch import rendezvous_endpoint
from trnft.common.config.run_config import load_config
from trnft.jobspecs import controllers, trainjob
from trnft.jobspecs.render import render, render_runtimes, runtime_document, stage_files
from trnft.jobspecs.validate import TRAINER_CRD_DIR, document_problems, trainjob_runtime_problems

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TRN1 = EXAMPLES / "llama31_8b_lora_trn1.yaml"
# sha256 of kubeflow/trainer v2.3.0 manifests/base/crds/<file> (checked against the tag's blobs when added).
UPSTREAM_SHA256 = {
    "trainer.kubeflow.org_trainjobs.yaml.gz": "a742cafc5b5582640c7e0b7467c024fc237256fbca5ba0a9f0531dfb66d64416",
    "trainer.kubeflow.org_clustertrainingruntimes.yaml.gz": (
        "ec84dc3388fcdbe8c61d3c247a773d14458dd9438e995bea8e50d2a18080eef9"
    ),
}


def _render(overrides: list[str]) -> tuple[dict, dict]:
    """(stage file -> document, the runtime) for the trn1 example with ``overrides``."""
    cfg = load_config(TRN1, overrides)
    docs = {name: yaml.safe_load(text) for name, text in render(cfg).items()}
    return docs, runtime_document(cfg).body()


def test_the_shipped_crds_are_the_upstream_v2_3_0_files():
    for name, digest in UPSTREAM_SHA256.items():
        assert hashlib.sha256(gzip.decompress((TRAINER_CRD_DIR / name).read_bytes())).hexdigest() == digest
    crd = yaml.safe_load(
        gzip.decompress((TRAINER_CRD_DIR / "trainer.kubeflow.org_trainjobs.yaml.gz").read_bytes())
    )
    assert [v["name"] for v in crd["spec"]["versions"]] == ["v1alpha1"]


def test_the_runtime_command_writes_the_runtime_the_trainjobs_reference(tmp_path, capsys):
    out = tmp_path / "runtimes"
    overrides = ["cluster.num_nodes=2", "cluster.zone=us-west-2a"]
    assert (
        cli.main(
            ["jobspec", "--config", str(TRN1), "--runtimes", "--validate", "--out", str(out), *overrides]
        )
        == 0
    )
    (file,) = out.iterdir()
    runtime = yaml.safe_load(file.read_text())
    assert file.name == "runtime-trnft-trn1-32xlarge.yaml" and runtime["kind"] == "ClusterTrainingRuntime"
    assert "kubectl apply -f" in capsys.readouterr().out
    docs, rendered_runtime = _render(overrides)
    assert runtime == rendered_runtime
    for stage in ("compile", "train"):
        assert docs[stage_files()[stage]]["spec"]["runtimeRef"] == {
            "apiGroup": "trainer.kubeflow.org",
            "kind": "ClusterTrainingRuntime",
            "name": "trnft-trn1-32xlarge",
        }
    assert trainjob_runtime_problems(list(docs.items()), runtime) == []


def test_runtimes_for_pytorchjobs_are_refused_in_one_line(tmp_path, capsys):
    args = [
        "jobspec",
        "--config",
        str(TRN1),
        "--runtimes",
        "--out",
        str(tmp_path / "o"),
        "cluster.operator=pytorchjob",
    ]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cluster.operator=trainjob" in err[0]
    assert not (tmp_path / "o").exists()


def test_trainjob_pods_are_the_pytorchjob_pods_trainer_makes_them():
    """What Trainer makes of TrainJob + runtime equals, field by field, what the PyTorchJob gives its pods
    (but the container name and the rendezvous env the two operators inject)."""
    overrides = [
        "cluster.num_nodes=2",
        "cluster.zone=us-west-2a",
        "cluster.service_account=trainer",
        "cluster.tolerations=[{key: dedicated, operator: Equal, value: ml, effect: NoSchedule}]",
    ]
    docs, runtime = _render(overrides)
    (v1_train,) = yaml.safe_load_all(
        render(load_config(TRN1, [*overrides, "cluster.operator=pytorchjob"]))["03-train.yaml"]
    )
    v1_pod = v1_train["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    pods = controllers.pod_templates(docs["03-train.yaml"], runtime)
    assert len(pods) == 2
    pod = pods[0]
    for key in ("nodeSelector", "serviceAccountName", "terminationGracePeriodSeconds"):
        assert pod["spec"][key] == v1_pod["spec"][key], key
    assert sorted(map(str, pod["spec"]["tolerations"])) == sorted(map(str, v1_pod["spec"]["tolerations"]))
    assert sorted(v["name"] for v in pod["spec"]["volumes"]) == ["run-config", "run-storage", "shm"]
    assert pod["spec"]["volumes"] == sorted(pod["spec"]["volumes"], key=lambda v: v["name"] != "shm")
    assert {v["name"]: v for v in pod["spec"]["volumes"]} == {v["name"]: v for v in v1_pod["spec"]["volumes"]}
    assert pod["metadata"]["labels"].items() >= v1_pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    (v1_container,) = v1_pod["spec"]["containers"]
    assert container["name"] == "node" and v1_container["name"] == "pytorch"
    for key in ("image", "resources", "securityContext"):
        assert container[key] == v1_container[key], key
    assert sorted(m["mountPath"] for m in container["volumeMounts"]) == sorted(
        m["mountPath"] for m in v1_container["volumeMounts"]
    )
    env = {e["name"]: e for e in container["env"]}
    v1_env = {e["name"]: e for e in v1_container["env"]}
    assert {k: v for k, v in env.items() if not k.startswith("PET_")} == v1_env
    assert [c for c in container["command"] if "rdzv_endpoint" not in c] == [
        c for c in v1_container["command"] if "rdzv_endpoint" not in c
    ]


def test_patches_replace_tolerations_whole_so_the_accelerator_one_is_repeated():
    docs, _runtime = _render(["cluster.tolerations=[{key: dedicated, operator: Exists}]"])
    patch_pod = docs["03-train.yaml"]["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"][
        "replicatedJobs"
    ][0]["template"]["spec"]["template"]["spec"]
    keys = [t["key"] for t in patch_pod["tolerations"]]
    assert keys == ["dedicated", "aws.amazon.com/neuron"]


def _trainjob_mutations():
    def trainer(d):
        return d["spec"]["trainer"]

    def patch_pod(d):
        return d["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
            "template"
        ]["spec"]["template"]["spec"]

    return [
        (lambda d: trainer(d)["env"].append({"name": "PET_NNODES", "value": "1"}), "must not set PET_NNODES"),
        (
            lambda d: patch_pod(d)["containers"][0].__setitem__("env", [{"name": "A", "value": "1"}]),
            "env from spec.trainer.env only",
        ),
        (lambda d: d["spec"]["runtimePatches"][0].__setitem__("manager", "trnft"), "domain-prefixed path"),
        (lambda d: trainer(d).pop("numProcPerNode"), "trnft TrainJobs give the number of processes"),
        (lambda d: trainer(d).__setitem__("numProcPerNode", 16), "2 pods x 16 processes != world size 64"),
        (lambda d: trainer(d).__setitem__("numNodes", 1), "torchrun --nnodes=2 != 1 pods"),
        (
            lambda d: trainer(d).__setitem__("nprocPerNode", 32),
            "Additional properties are not allowed ('nprocPerNode'",
        ),
        (
            lambda d: trainer(d)["env"].append({"name": "HF_TOKEN", "value": "hf_x"}),
            "must come from a Secret",
        ),
        (lambda d: patch_pod(d).pop("nodeSelector"), "must keep its pods in one zone"),
        (lambda d: d.__setitem__("apiVersion", "trainer.kubeflow.org/v1"), "no served version"),
    ]


@pytest.mark.parametrize(("mutate", "message"), _trainjob_mutations())
def test_a_broken_trainjob_is_rejected_naming_its_path(mutate, message):
    docs, _ = _render(["cluster.num_nodes=2", "cluster.zone=us-west-2a"])
    doc = copy.deepcopy(docs["03-train.yaml"])
    assert document_problems(doc) == []
    mutate(doc)
    problems = document_problems(doc)
    assert any(message in f"{path}: {text}" for path, text in problems), problems


def _runtime_mutations():
    def job(r):
        return r["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]

    def rules(r):
        return r["spec"]["template"]["spec"]["failurePolicy"]["rules"]

    return [
        (lambda r: job(r).__setitem__("backoffLimit", 3), "must be 0 (a failed pod restarts the whole gang)"),
        (
            lambda r: rules(r)[0].__setitem__(
                "onJobFailureMessagePatterns", ["matching FailJob rule at index (0|1)$"]
            ),
            "index 1 must point at a FailJob rule of the podFailurePolicy for evicted",
        ),
        (
            lambda r: job(r)["podFailurePolicy"].__setitem__(
                "rules", job(r)["podFailurePolicy"]["rules"][1::-1]
            ),
            "must point at a FailJob rule",
        ),
        (lambda r: rules(r)[1].__setitem__("name", "permanent-exit"), "'permanent-exit' is refused"),
        (lambda r: rules(r)[2].__setitem__("name", "evicted"), "are all named 'evicted'"),
        (
            lambda r: r["spec"]["template"]["spec"]["failurePolicy"].pop("maxRestarts"),
            "restarts must be bounded",
        ),
        (
            lambda r: job(r)["template"]["spec"]["containers"][0].__setitem__("name", "trainer"),
            "container named node",
        ),
        (
            lambda r: r["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["metadata"].__setitem__(
                "labels", {}
            ),
            "needs exactly one job labelled",
        ),
        (
            lambda r: job(r)["template"]["spec"].__setitem__("restartPolicy", "OnFailure"),
            "must be Never when podFailurePolicy is set",
        ),
        (lambda r: rules(r)[0].__setitem__("action", "Restart"), "rules.0.action"),
        (lambda r: r["metadata"].__setitem__("name", "Trnft_Runtime"), "is not a DNS-1123 subdomain"),
    ]


@pytest.mark.parametrize(("mutate", "message"), _runtime_mutations())
def test_a_broken_runtime_is_rejected_naming_its_path(mutate, message):
    _, runtime = _render([])
    runtime = copy.deepcopy(runtime)
    assert document_problems(runtime) == []
    mutate(runtime)
    problems = document_problems(runtime)
    assert any(message in f"{path}: {text}" for path, text in problems), problems


def test_a_trainjob_naming_another_runtime_or_an_unknown_container_is_caught():
    docs, runtime = _render([])
    doc = copy.deepcopy(docs["03-train.yaml"])
    doc["spec"]["runtimeRef"]["name"] = "torch-distributed"
    doc["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
        "template"
    ]["spec"]["template"]["spec"]["containers"][0]["name"] = "sidecar"
    lines = trainjob_runtime_problems([("03-train.yaml", doc)], runtime)
    assert any("'torch-distributed' is not the rendered runtime" in line for line in lines)
    assert any("container 'sidecar' is not in runtime" in line for line in lines)


def test_trainium_trainjobs_always_give_the_process_count():
    """Trainer's `numProcPerNode: auto` counts only resources named like gpu (plugins/torch): on Trainium it
    would start one process per CPU. trnft sets the number from the instance table."""
    for example, nproc in (
        ("llama31_8b_lora_trn1.yaml", 32),
        ("llama31_8b_lora_trn2_native.yaml", 64),
        ("llama31_8b_lora_p5.yaml", 8),
    ):
        train = yaml.safe_load(render(load_config(EXAMPLES / example))["03-train.yaml"])
        assert train["spec"]["trainer"]["numProcPerNode"] == nproc, example


@pytest.mark.parametrize(
    ("env", "endpoint"),
    [
        (
            {"PET_MASTER_ADDR": "run-compile-node-0-0.run-compile", "PET_MASTER_PORT": "29500"},
            "run-compile-node-0-0.run-compile:29500",
        ),
        ({"MASTER_ADDR": "run-compile-master-0", "MASTER_PORT": "23456"}, "run-compile-master-0:23456"),
        ({}, "localhost:29500"),
    ],
)
def test_compile_finds_the_first_pod_under_either_operator(env, endpoint):
    """neuron_parallel_compile's torchrun (started by `trnft compile` in the pod) meets where the operator says."""
    assert rendezvous_endpoint(env) == endpoint


def test_the_runtime_is_the_same_for_every_run_on_an_instance_type():
    """Per-run values (volumes, zone, grace, service account) live in the TrainJob's patch, never in the
    runtime, so two runs on the same hardware share one runtime."""
    a = runtime_document(
        load_config(TRN1, ["run.name=a", "cluster.zone=us-west-2a", "cluster.stop_grace_seconds=900"])
    ).body()
    b = runtime_document(
        load_config(TRN1, ["run.name=b", "cluster.service_account=x", "cluster.storage.claim_name=other"])
    ).body()
    assert a == b and a["metadata"]["name"] == trainjob.runtime_name("trn1.32xlarge", volcano=False)
    files = render_runtimes(
        load_config(TRN1, ["cluster.num_nodes=2", "cluster.gang_scheduler=volcano", "cluster.queue=q"])
    )
    assert list(files) == ["runtime-trnft-trn1-32xlarge-volcano.yaml"]


def test_one_change_to_the_pod_partial_reaches_every_operators_pods(tmp_path, monkeypatch):
    """Every spec is written by a template sharing _pod.yaml.j2: a platform team that adds an annotation
    there once sees it on the Jobs, both PyTorchJob replicas, the TrainJob's patched pod, the runtime's and
    the RayJob's head and worker pods."""
    import shutil

    import jinja2

    from trnft.jobspecs import render as render_module

    folder = tmp_path / "templates"
    shutil.copytree(
        Path(render_module.__file__).parent, folder, ignore=shutil.ignore_patterns("*.py", "crds")
    )
    partial = folder / "_pod.yaml.j2"
    text = partial.read_text()
    marker = "annotations:{{ pod.annotations | nested(2) }}"
    assert text.count(marker) == 1
    partial.write_text(text.replace(marker, marker + "\n  example.com/sidecar: injected", 1))
    environment = render_module._environment()
    changed = jinja2.Environment(
        loader=jinja2.FileSystemLoader(folder), undefined=jinja2.StrictUndefined, autoescape=False,
        keep_trailing_newline=True,
    )  # fmt: skip
    changed.filters.update(environment.filters)
    monkeypatch.setattr(render_module, "_environment", lambda: changed)

    def pod_annotations(doc: dict) -> list[dict]:
        if doc["kind"] == "Job":
            return [doc["spec"]["template"]["metadata"]["annotations"]]
        if doc["kind"] == "PyTorchJob":
            return [
                r["template"]["metadata"]["annotations"] for r in doc["spec"]["pytorchReplicaSpecs"].values()
            ]
        if doc["kind"] == "TrainJob":
            template = doc["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]
            return [
                template["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["metadata"][
                    "annotations"
                ]
            ]
        if doc["kind"] == "RayJob":
            cluster = doc["spec"]["rayClusterSpec"]
            groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
            return [g["template"]["metadata"]["annotations"] for g in groups]
        assert doc["kind"] == "ClusterTrainingRuntime"
        return [
            doc["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["metadata"][
                "annotations"
            ]
        ]

    seen = set()
    for config, overrides in (
        (TRN1, ["cluster.num_nodes=2", "cluster.zone=us-west-2a"]),
        (TRN1, ["cluster.num_nodes=2", "cluster.zone=us-west-2a", "cluster.operator=pytorchjob"]),
        (
            EXAMPLES / "llama31_8b_lora_p5.yaml",
            ["cluster.num_nodes=2", "cluster.zone=us-west-2a", "cluster.operator=rayjob"],
        ),
    ):
        cfg = load_config(config, overrides)
        texts = [
            *render(cfg).values(),
            *(render_runtimes(cfg).values() if cfg.cluster.operator == "trainjob" else []),
        ]
        for doc in (d for text in texts for d in yaml.safe_load_all(text) if d and d["kind"] != "ConfigMap"):
            for found in pod_annotations(doc):
                assert found.get("example.com/sidecar") == "injected", doc["kind"]
            seen.add(doc["kind"])
    assert seen == {"Job", "PyTorchJob", "TrainJob", "ClusterTrainingRuntime", "RayJob"}
