"""Kubernetes specs: goldens, offline validation of every document, mutations, invariants, the script."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trnft.common import cli
from trnft.common.config.run_config import load_config
from trnft.common.errors import ConfigError
from trnft.jobspecs import controllers
from trnft.jobspecs.render import render, render_runtimes, stage_files
from trnft.jobspecs.validate import ACCELERATOR_RESOURCES, document_problems, validate_documents

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
GOLDEN = Path(__file__).parent / "golden"
# The upstream PyTorchJob CRD ships with the tests (crds/README.md), so this check never silently disappears.
UPSTREAM_CRD = Path(__file__).parent / "crds" / "kubeflow.org_pytorchjobs.yaml"
CRDS = [None, str(UPSTREAM_CRD)]

PYTORCHJOB = "cluster.operator=pytorchjob"
# The goldens of training-operator v1 PyTorchJobs (cluster.operator=pytorchjob) and of Trainer v2 TrainJobs.
CASES = {
    "trn1-32xl-x1": ("llama31_8b_lora_trn1.yaml", []),
    "trn1-32xl-x4": (
        "llama31_8b_lora_trn1.yaml",
        [
            "cluster.num_nodes=4",
            "run.name=llama31-8b-lora-x4",
            "cluster.gang_scheduler=volcano",
            "cluster.queue=q",
        ],
    ),
    "trn1n-32xl-x2": (
        "llama31_8b_lora_trn1.yaml",
        [
            "cluster.instance_type=trn1n.32xlarge",
            "cluster.num_nodes=2",
            "run.name=llama31-8b-trn1n",
            "cluster.gang_scheduler=kueue",
            "cluster.queue=q",
        ],
    ),
    "trn2-48xl-x1": ("qwen3_8b_lora_trn2.yaml", []),
    # neuron-native: compile and train are PyTorchJobs running torchrun (a trial run, then training).
    "trn2-48xl-native-x1": ("llama31_8b_lora_trn2_native.yaml", []),
    "trn2-48xl-native-x2": (
        "llama31_8b_lora_trn2_native.yaml",
        ["cluster.num_nodes=2", "cluster.gang_scheduler=kueue", "cluster.queue=q"],
    ),
    "p5-48xl-x2": ("llama31_8b_lora_p5.yaml", ["cluster.num_nodes=2", "cluster.zone=us-west-2b"]),
    # Gang scheduling and a pinned zone, one golden each.
    "trn1-32xl-x2-volcano": (
        "llama31_8b_lora_trn1.yaml",
        ["cluster.num_nodes=2", "cluster.gang_scheduler=volcano", "cluster.queue=training"],
    ),
    "p5-48xl-x2-kueue-zone": (
        "llama31_8b_lora_p5.yaml",
        [
            "cluster.num_nodes=2",
            "cluster.gang_scheduler=kueue",
            "cluster.queue=gpu-queue",
            "cluster.zone=us-west-2b",
        ],
    ),
}


CASES = {name: (example, [PYTORCHJOB, *overrides]) for name, (example, overrides) in CASES.items()}
CASES |= {
    "trn1-32xl-x1-trainjob": ("llama31_8b_lora_trn1.yaml", []),
    "trn1-32xl-x2-trainjob-zone": (
        "llama31_8b_lora_trn1.yaml",
        ["cluster.num_nodes=2", "cluster.zone=us-west-2b"],
    ),
    "trn2-48xl-native-x2-trainjob-kueue": (
        "llama31_8b_lora_trn2_native.yaml",
        ["cluster.num_nodes=2", "cluster.gang_scheduler=kueue", "cluster.queue=q"],
    ),
    "p5-48xl-x2-trainjob-volcano": (
        "llama31_8b_lora_p5.yaml",
        ["cluster.num_nodes=2", "cluster.gang_scheduler=volcano", "cluster.queue=training"],
    ),
}
# Runtimes rendered so far, by name: TrainJob pods are what Trainer makes of a TrainJob on its runtime.
RUNTIMES: dict[str, dict] = {}


def texts(cfg) -> dict[str, str]:
    """Every file of a run's specs; with TrainJobs, also the runtime `trnft jobspec --runtimes` renders."""
    files = render(cfg)
    if cfg.cluster.operator == "trainjob":
        runtime_files = render_runtimes(cfg)
        for text in runtime_files.values():
            runtime = yaml.safe_load(text)
            RUNTIMES[runtime["metadata"]["name"]] = runtime
        files |= runtime_files
    return files


def rendered(case: str) -> dict[str, list[dict]]:
    example, overrides = CASES[case]
    files = texts(load_config(EXAMPLES / example, overrides))
    return {name: [d for d in yaml.safe_load_all(text) if d] for name, text in files.items()}


def all_docs(files: dict[str, list[dict]]) -> list[tuple[str, dict]]:
    return [(name, doc) for name, docs in files.items() for doc in docs]


def _pods(doc: dict) -> list[dict]:
    """Pod templates of a job: one per PyTorchJob replica type, one per TrainJob node as Trainer makes them."""
    if doc["kind"] == "Job":
        return [doc["spec"]["template"]]
    if doc["kind"] == "PyTorchJob":
        return [r["template"] for r in doc["spec"]["pytorchReplicaSpecs"].values()]
    if doc["kind"] == "TrainJob":
        return controllers.pod_templates(doc, RUNTIMES[doc["spec"]["runtimeRef"]["name"]])
    return []


def _training_shape(doc: dict) -> tuple[int, int, dict]:
    """(pods, processes per pod, first pod's container) of a PyTorchJob or TrainJob."""
    container = _pods(doc)[0]["spec"]["containers"][0]
    if doc["kind"] == "PyTorchJob":
        replicas = sum(r["replicas"] for r in doc["spec"]["pytorchReplicaSpecs"].values())
        return replicas, int(doc["spec"]["nprocPerNode"]), container
    return doc["spec"]["trainer"]["numNodes"], doc["spec"]["trainer"]["numProcPerNode"], container


TRAINING_KINDS = ("PyTorchJob", "TrainJob")


@pytest.mark.parametrize("case", CASES)
def test_golden(case):
    """Rendered specs equal the committed goldens (parsed YAML). UPDATE_GOLDEN=1 rewrites them."""
    files = rendered(case)
    folder = GOLDEN / case
    if os.environ.get("UPDATE_GOLDEN") == "1":
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.yaml"):
            old.unlink()
        example, overrides = CASES[case]
        for name, text in texts(load_config(EXAMPLES / example, overrides)).items():
            (folder / name).write_text(text)
    assert sorted(p.name for p in folder.glob("*.yaml")) == sorted(files)
    for name, docs in files.items():
        assert [d for d in yaml.safe_load_all((folder / name).read_text()) if d] == docs, (
            f"{case}/{name} differs"
        )


@pytest.mark.parametrize("crd", CRDS, ids=lambda c: "upstream-crd" if c else "own-schema")
@pytest.mark.parametrize("case", CASES)
def test_every_rendered_document_is_valid(case, crd):
    assert validate_documents(all_docs(rendered(case)), crd_path=crd) == []


def test_configmap_carries_the_resolved_config(tmp_path):
    cfg = load_config(EXAMPLES / "llama31_8b_lora_trn1.yaml", [PYTORCHJOB])
    (cm,) = rendered("trn1-32xl-x1")["00-config.yaml"]
    path = tmp_path / "run.yaml"
    path.write_text(cm["data"]["run.yaml"])
    assert load_config(path) == cfg


@pytest.mark.parametrize("case", CASES)
def test_cpu_stages_request_no_accelerator_and_training_layout_adds_up(case):
    files = rendered(case)
    cfg = load_config(EXAMPLES / CASES[case][0], CASES[case][1])
    for name, doc in all_docs(files):
        if doc["kind"] in ("ConfigMap", "ClusterTrainingRuntime"):
            continue
        for pod in [p["spec"] for p in _pods(doc)]:
            (container,) = pod["containers"]
            asked = set(container["resources"].get("requests", {})) | set(
                container["resources"].get("limits", {})
            )
            accelerated = doc["metadata"]["labels"]["trnft.dev/accelerator"] != "none"
            assert accelerated == bool(asked & set(ACCELERATOR_RESOURCES)), name
            if not accelerated:
                assert "nodeSelector" not in pod or "trn" not in str(pod["nodeSelector"])
            shm = next(v for v in pod["volumes"] if v["name"] == "shm")
            assert shm["emptyDir"]["medium"] == "Memory"
            assert not any(v.get("hostPath") for v in pod["volumes"])
    train = files[stage_files()["train"]][0]
    world = int(train["metadata"]["annotations"]["trnft.dev/world-size"])
    replicas, nproc, container = _training_shape(train)
    assert len(_pods(train)) == (replicas if train["kind"] == "TrainJob" else min(replicas, 2))
    assert replicas == cfg.cluster.num_nodes and nproc * replicas == world
    command = container["command"]
    assert (
        command[:2] == ["trnft", "torchrun"]
        and f"--nproc_per_node={nproc}" in command
        and f"--nnodes={replicas}" in command
    )
    assert "--rdzv_backend=c10d" in command and f"--rdzv_id={train['metadata']['name']}" in command
    assert not any("etcd" in part for part in command)
    tp, pp, dp = (
        int(x.split("=")[1]) for x in train["metadata"]["annotations"]["trnft.dev/parallel"].split(",")
    )
    assert tp * pp * dp == world
    env = {e["name"]: e for e in container["env"]}
    if train["kind"] == "TrainJob":
        # torchrun meets the first pod where the torch plugin says it is.
        assert "--rdzv_endpoint=$(PET_MASTER_ADDR):$(PET_MASTER_PORT)" in command
        assert {"PET_MASTER_ADDR", "PET_MASTER_PORT", "PET_NNODES"} <= set(env)
        assert (
            env["PET_MASTER_ADDR"]["value"]
            == f"{train['metadata']['name']}-node-0-0.{train['metadata']['name']}"
        )
    if cfg.model.platform == "neuron":
        assert env["NEURON_RT_NUM_CORES"]["value"] == str(nproc)
        assert f"--cache_dir={cfg.neuron.cache_dir}" in env["NEURON_CC_FLAGS"]["value"]
        assert (
            "--target=trn2" in env["NEURON_CC_FLAGS"]["value"]
            if "trn2" in case
            else "--target=trn1" in env["NEURON_CC_FLAGS"]["value"]
        )
    resources = container["resources"]["limits"]
    assert ("vpc.amazonaws.com/efa" in resources) == (cfg.cluster.num_nodes > 1)
    assert ("FI_PROVIDER" in env) == (cfg.cluster.num_nodes > 1)


def test_trn2_uses_logical_cores():
    train = rendered("trn2-48xl-x1")[stage_files()["train"]][0]
    assert train["spec"]["nprocPerNode"] == "64"  # 128 physical cores at LNC=2
    env = {
        e["name"]: e.get("value")
        for e in train["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["NEURON_LOGICAL_NC_CONFIG"] == "2" and "--logical-nc-config=2" in env["NEURON_CC_FLAGS"]


def test_no_literal_secret_anywhere(monkeypatch):
    token = "hf_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4"
    monkeypatch.setenv("HF_TOKEN", token)
    for case in CASES:
        example, overrides = CASES[case]
        cfg = load_config(EXAMPLES / example, overrides)
        texts = render(cfg)
        seen = 0
        for name, text in texts.items():
            assert token not in text and not re.search(r"hf_[A-Za-z0-9]{20,}", text), f"{case}/{name}"
            for doc in yaml.safe_load_all(text):
                for entry in _env_entries(doc, "HF_TOKEN"):
                    seen += 1
                    assert set(entry) == {"name", "valueFrom"}, f"{case}/{name}"
                    assert entry["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "HF_TOKEN"}
        if cfg.cluster.hf_token_secret:
            assert seen > 0, (
                f"{case}: no pod gets HF_TOKEN from the Secret, so the check above checked nothing"
            )
        else:
            assert seen == 0, f"{case}: HF_TOKEN set although cluster.hf_token_secret is not"


def _env_entries(node, name: str) -> list[dict]:
    """Every container env entry called ``name`` anywhere in a document."""
    found = []
    if isinstance(node, dict):
        if node.get("name") == name and ("value" in node or "valueFrom" in node):
            found.append(node)
        for value in node.values():
            found += _env_entries(value, name)
    elif isinstance(node, list):
        for value in node:
            found += _env_entries(value, name)
    return found


def test_job_names_are_stable_dns_1035(tmp_path):
    first = rendered("trn1-32xl-x1")
    assert rendered("trn1-32xl-x1") == first
    names = [doc["metadata"]["name"] for _, doc in all_docs(first)]
    assert names == ["llama31-8b-lora-config"] + [
        f"llama31-8b-lora-{s}" for s in ("tokenize", "compile", "train", "consolidate", "merge", "evaluate")
    ]


# -- refusals before rendering ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["parallel.tp=6"],
            "parallel.tp: 6 does not divide the 32 NeuronCores of a trn1.32xlarge; use one of 1, 2, 4, 8, 16, 32",
        ),
        (
            ["cluster.instance_type=p5.48xlarge"],
            "cluster.instance_type: p5.48xlarge is a gpu instance but model.platform is neuron",
        ),
        (["cluster.instance_type=trn9.big"], "cluster.instance_type: unknown instance type 'trn9.big'"),
        (["cluster.image="], "cluster.image: not set"),
        (["run.root=/home/me/run"], "run.root: /home/me/run is not on the shared volume mounted at /fsx"),
        (["neuron.cache_dir=/fsx/cache-v2/x y"], "neuron.cache_dir: '/fsx/cache-v2/x y' contains ' '"),
        (
            ["cluster.eval_instance_type=g6e.12xlarge", "eval.tensor_parallel_size=8"],
            "eval.tensor_parallel_size: 8 exceeds the 4 GPUs of a g6e.12xlarge",
        ),
    ],
)
def test_impossible_values_refused_before_rendering(tmp_path, capsys, overrides, message):
    out = tmp_path / "out"
    code = cli.main(
        [
            "jobspec",
            "--config",
            str(EXAMPLES / "llama31_8b_lora_trn1.yaml"),
            "--out",
            str(out),
            "--validate",
            *overrides,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    with pytest.raises(ConfigError):
        render(load_config(EXAMPLES / "llama31_8b_lora_trn1.yaml", overrides))


# -- mutations: a broken field in each kind is rejected naming its path ---------------------------------


def _mutations():
    def master(doc):
        return doc["spec"]["pytorchReplicaSpecs"]["Master"]

    def master_container(doc):
        return master(doc)["template"]["spec"]["containers"][0]

    def job_container(doc):
        return doc["spec"]["template"]["spec"]["containers"][0]

    return [
        (
            "00-config.yaml",
            lambda d: d["data"].__setitem__("run.yaml", 5),
            "data.run.yaml: 5 is not of type 'string'",
        ),
        (
            "00-config.yaml",
            lambda d: d.__setitem__("dta", {}),
            "Additional properties are not allowed ('dta' was unexpected)",
        ),
        (
            "01-tokenize.yaml",
            lambda d: job_container(d).__setitem__("imagePullPolicyy", "Always"),
            "spec.template.spec.containers.0: Additional properties are not allowed ('imagePullPolicyy'",
        ),
        (
            "01-tokenize.yaml",
            lambda d: job_container(d)["resources"]["requests"].__setitem__("memory", "64 Gi"),
            "spec.template.spec.containers.0.resources.requests.memory: '64 Gi' is not a quantity",
        ),
        (
            "01-tokenize.yaml",
            lambda d: d["spec"]["template"]["spec"].__setitem__("restartPolicy", "Always"),
            "spec.template.spec.restartPolicy: must be Never or OnFailure for a Job",
        ),
        (
            "01-tokenize.yaml",
            lambda d: d["spec"].__setitem__("backoffLimit", "three"),
            "spec.backoffLimit: 'three' is not of type 'integer'",
        ),
        (
            "01-tokenize.yaml",
            lambda d: job_container(d)["env"].append({"name": "HF_TOKEN", "value": "hf_xyz"}),
            "env.5.value: HF_TOKEN must come from a Secret",
        ),
        (
            "01-tokenize.yaml",
            lambda d: job_container(d)["resources"]["limits"].__setitem__("nvidia.com/gpu", "1"),
            "a CPU stage must not request nvidia.com/gpu",
        ),
        (
            "03-train.yaml",
            lambda d: master(d).__setitem__("replicas", 2),
            "spec.pytorchReplicaSpecs.Master.replicas: must be 1, got 2",
        ),
        (
            "03-train.yaml",
            lambda d: master_container(d).__setitem__("name", "trainer"),
            "must have at least one container named pytorch",
        ),
        ("03-train.yaml", lambda d: d["metadata"].__setitem__("name", "Llama_Train"), "metadata.name"),
        (
            "03-train.yaml",
            lambda d: d["spec"].__setitem__("nprocPerNode", 32),
            "spec.nprocPerNode: 32 is not of type 'string'",
        ),
        (
            "03-train.yaml",
            lambda d: d["spec"]["runPolicy"].__setitem__("cleanupPolicy", "All"),
            "spec.runPolicy: Additional properties are not allowed ('cleanupPolicy' was unexpected)",
        ),
        (
            "03-train.yaml",
            lambda d: d["spec"].__setitem__("elasticPolicy", {"rdzvBackend": "c10d"}),
            "spec.pytorchReplicaSpecs.Worker: required when elasticPolicy is used",
        ),
        (
            "03-train.yaml",
            lambda d: master_container(d)["resources"]["limits"].__setitem__("memory", "64GBx"),
            "resources.limits.memory",
        ),
        ("03-train.yaml", lambda d: d.__setitem__("apiVersion", "kubeflow.org/v2"), "apiVersion"),
        (
            "03-train.yaml",
            lambda d: d["spec"].__setitem__("nprocPerNode", "16"),
            "x 16 processes != world size 32",
        ),
        (
            "03-train.yaml",
            lambda d: master_container(d)["env"][5].__setitem__("value", "16"),
            "NEURON_RT_NUM_CORES=16 != spec.nprocPerNode 32",
        ),
        (
            "01-tokenize.yaml",
            lambda d: d["spec"]["template"]["spec"].__setitem__("restartPolicy", "OnFailure"),
            "spec.template.spec.restartPolicy: must be Never when spec.podFailurePolicy is set",
        ),
        (
            "01-tokenize.yaml",
            lambda d: d["spec"]["podFailurePolicy"]["rules"][1]["onExitCodes"].__setitem__("values", [0, 1]),
            "onExitCodes.values: 0 cannot be used with the In operator",
        ),
        (
            "03-train.yaml",
            lambda d: master(d).__setitem__("restartPolicy", "OnFailure"),
            "spec.pytorchReplicaSpecs.Master.restartPolicy: must be ExitCode",
        ),
        (
            "03-train.yaml",
            lambda d: d["spec"]["runPolicy"].__setitem__("cleanPodPolicy", "None"),
            "spec.runPolicy.cleanPodPolicy: must be Running, got 'None'",
        ),
    ]


@pytest.mark.parametrize("crd", CRDS, ids=lambda c: "upstream-crd" if c else "own-schema")
@pytest.mark.parametrize(
    ("file", "mutate", "message"), _mutations(), ids=lambda x: x if isinstance(x, str) else ""
)
def test_mutation_is_rejected_naming_its_path(file, mutate, message, crd):
    doc = copy.deepcopy(rendered("trn1-32xl-x1")[file][0])
    assert document_problems(doc, crd) == []
    mutate(doc)
    problems = document_problems(doc, crd)
    assert any(message in f"{path}: {text}" for path, text in problems), problems


def test_all_problems_are_reported_not_just_the_first():
    doc = copy.deepcopy(rendered("trn1-32xl-x1")["01-tokenize.yaml"][0])
    doc["spec"]["backoffLimit"] = "three"
    doc["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    doc["spec"]["template"]["spec"]["containers"][0].pop("name")
    lines = validate_documents([("01-tokenize.yaml", doc)])
    assert len(lines) == 3 and all(
        line.startswith("01-tokenize.yaml: Job/llama31-8b-lora-tokenize: ") for line in lines
    )


def test_validate_files_command(tmp_path, capsys):
    good = tmp_path / "good"
    assert (
        cli.main(
            [
                "jobspec",
                "--config",
                str(EXAMPLES / "llama31_8b_lora_trn1.yaml"),
                "--out",
                str(good),
                "--validate",
                PYTORCHJOB,
            ]
        )
        == 0
    )
    files = sorted(good.glob("*.yaml"))
    assert cli.main(["jobspec", "--config", "x", "--files", *map(str, files)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(files[3].read_text().replace("replicas: 1", "replicas: 3"))
    assert cli.main(["jobspec", "--config", "x", "--files", str(bad)]) == 1
    assert "Master.replicas: must be 1, got 3" in capsys.readouterr().out


# -- generate-jobspec.sh ------------------------------------------------------------------------------


def _script_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return env


def test_generate_jobspec_script_defaults_to_the_trn1_example(tmp_path):
    proc = subprocess.run(
        [str(REPO / "generate-jobspec.sh")], cwd=tmp_path, capture_output=True, text=True, env=_script_env()
    )
    out = tmp_path / "rendered"  # the default OUTDIR, relative to the caller
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["00-config.yaml", *sorted(stage_files().values())]
    commands = [line.split() for line in proc.stdout.splitlines() if line.startswith("  ")]
    # First the TrainJobs' runtime must exist (an admin applies it once), then the config, then each stage.
    assert commands[0] == [
        "kubectl",
        "get",
        "clustertrainingruntimes.trainer.kubeflow.org/trnft-trn1-32xlarge",
    ]
    assert commands[1][:3] == ["kubectl", "apply", "-f"]
    assert all(c[:2] == ["trnft", "submit"] and "--wait" in c for c in commands[2:])
    assert [c[-1 if c[0] == "kubectl" else 2].split("/")[-1] for c in commands[1:]] == [
        "00-config.yaml",
        *stage_files().values(),
    ]
    assert "TP=8 x PP=1 x DP=4" in proc.stdout and "(validated)" in proc.stdout


def test_generate_jobspec_script_stops_on_a_missing_value_and_leaves_nothing(tmp_path):
    config = tmp_path / "run.yaml"
    raw = yaml.safe_load((EXAMPLES / "llama31_8b_lora_trn1.yaml").read_text())
    raw["cluster"]["image"] = ""
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "specs"
    proc = subprocess.run(
        [str(REPO / "generate-jobspec.sh"), str(config), str(out)],
        capture_output=True,
        text=True,
        env=_script_env(),
    )
    assert proc.returncode == 2
    assert "cluster.image: not set" in proc.stderr
    assert not out.exists()


def test_rerender_replaces_the_folder_and_refuses_foreign_files(tmp_path):
    out = tmp_path / "specs"
    args = ["jobspec", "--config", str(EXAMPLES / "llama31_8b_lora_trn1.yaml"), "--out", str(out)]
    assert cli.main(args) == 0
    assert cli.main([*args, "cluster.num_nodes=2", "cluster.zone=us-west-2a"]) == 0
    assert "--nnodes=2" in (out / "03-train.yaml").read_text()
    (out / "notes.txt").write_text("mine")
    assert cli.main(args) == 1
    assert (out / "notes.txt").exists()


# -- failure handling, placement and gang scheduling ---------------------------------------------------

EXAMPLE_FILES = ["llama31_8b_lora_trn1.yaml", "llama31_8b_lora_p5.yaml", "qwen3_8b_lora_trn2.yaml"]
SCHEDULERS = {
    "zone": ["cluster.zone=us-west-2a"],  # no gang scheduler: multi-node needs the zone named
    "kueue": ["cluster.gang_scheduler=kueue", "cluster.queue=trn-queue"],
    "volcano": ["cluster.gang_scheduler=volcano", "cluster.queue=training"],
}


def _docs(example: str, overrides: list[str]) -> list[tuple[str, dict]]:
    files = texts(load_config(EXAMPLES / example, overrides))
    return [(name, d) for name, text in files.items() for d in yaml.safe_load_all(text) if d]


@pytest.mark.parametrize("crd", CRDS, ids=lambda c: "upstream-crd" if c else "own-schema")
@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("nodes", [1, 2, 4])
@pytest.mark.parametrize("example", EXAMPLE_FILES)
def test_every_example_validates_at_1_2_and_4_nodes(example, nodes, scheduler, crd):
    docs = _docs(example, [f"cluster.num_nodes={nodes}", *SCHEDULERS[scheduler]])
    assert validate_documents(docs, crd_path=crd) == []


@pytest.mark.parametrize("case", CASES)
def test_permanent_exits_fail_at_once_and_retryable_ones_restart(case):
    """PyTorchJobs: ExitCode (1-127 fail the job, 128+ restart it), running pods cleaned up on failure.
    Jobs: a podFailurePolicy with the same classes; evictions do not count against backoffLimit.
    TrainJobs: the child Job fails on its first failed pod; the JobSet restarts the whole gang, free for an
    eviction, counted for a retryable exit, never for a permanent one."""
    from trnft.common.exits import FIRST_RETRYABLE
    from trnft.jobspecs import trainjob

    kinds = set()
    permanent = list(range(1, FIRST_RETRYABLE))
    for _, doc in all_docs(rendered(case)):
        kinds.add(doc["kind"])
        if doc["kind"] == "PyTorchJob":
            assert {r["restartPolicy"] for r in doc["spec"]["pytorchReplicaSpecs"].values()} == {"ExitCode"}
            policy = {k: v for k, v in doc["spec"]["runPolicy"].items() if k != "schedulingPolicy"}
            assert policy == {"backoffLimit": 5, "cleanPodPolicy": "Running"}
        if doc["kind"] == "Job":
            rules = doc["spec"]["podFailurePolicy"]["rules"]
            assert rules[0] == {
                "action": "Ignore",
                "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
            }
            assert rules[1]["action"] == "FailJob"
            assert rules[1]["onExitCodes"] == {
                "containerName": "pytorch",
                "operator": "In",
                "values": permanent,
            }
            assert doc["spec"]["template"]["spec"]["restartPolicy"] == "Never"
            assert doc["spec"]["backoffLimit"] == 5
        if doc["kind"] == "ClusterTrainingRuntime":
            jobset = doc["spec"]["template"]["spec"]
            (node,) = jobset["replicatedJobs"]
            child = node["template"]["spec"]
            assert child["backoffLimit"] == 0 and child["template"]["spec"]["restartPolicy"] == "Never"
            evicted, permanent_rule, stopped = child["podFailurePolicy"]["rules"]
            assert evicted == {
                "action": "FailJob",
                "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
            }
            assert permanent_rule["onExitCodes"] == {
                "containerName": "node",
                "operator": "In",
                "values": permanent,
            }
            assert stopped == {
                "action": "FailJob",
                "onExitCodes": {"containerName": "node", "operator": "In", "values": [143]},
            }
            policy = jobset["failurePolicy"]
            assert (
                policy["maxRestarts"] == trainjob.RUNTIME_MAX_RESTARTS
                and policy["restartStrategy"] == "BlockingRecreate"
            )
            actions = [(r["action"], r.get("onJobFailureMessagePatterns")) for r in policy["rules"]]
            assert actions == [
                ("RestartJobSetAndIgnoreMaxRestarts", ["matching FailJob rule at index (0|2)$"]),
                ("FailJobSet", ["matching FailJob rule at index (1)$"]),
                ("RestartJobSet", None),
            ]
    assert {"Job", "PyTorchJob"} <= kinds or {"Job", "TrainJob", "ClusterTrainingRuntime"} <= kinds


def _job_failure_message(pod: str, rule: int, by: str, code: int = 2) -> str:
    """The batch Job controller's failure message for a FailJob rule (pkg/controller/job/pod_failure_policy.go)."""
    if by == "condition":
        return f"Pod default/{pod} has condition DisruptionTarget matching FailJob rule at index {rule}"
    return f"Container node for pod default/{pod} failed with exit code {code} matching FailJob rule at index {rule}"


@pytest.mark.parametrize(
    ("message", "reason", "action"),
    [
        (
            _job_failure_message("t-node-0-1-abcde", 0, "condition"),
            "PodFailurePolicy",
            "RestartJobSetAndIgnoreMaxRestarts",
        ),
        (
            _job_failure_message("t-node-0-0-abcde", 2, "exit", 143),
            "PodFailurePolicy",
            "RestartJobSetAndIgnoreMaxRestarts",
        ),
        (_job_failure_message("t-node-0-0-abcde", 1, "exit"), "PodFailurePolicy", "FailJobSet"),
        ("Job has reached the specified backoff limit", "BackoffLimitExceeded", "RestartJobSet"),
    ],
)
def test_the_jobset_rules_tell_evictions_permanent_and_retryable_failures_apart(message, reason, action):
    """JobSet applies the first rule whose reasons and message patterns (regular expressions) match the
    failed child Job's condition; each failure class meets exactly the rule meant for it."""
    (runtime,) = rendered("trn1-32xl-x2-trainjob-zone")["runtime-trnft-trn1-32xlarge.yaml"]
    rules = runtime["spec"]["template"]["spec"]["failurePolicy"]["rules"]
    matching = [
        r["action"]
        for r in rules
        if reason in r.get("onJobFailureReasons", [reason])
        and all(re.search(p, message) for p in r.get("onJobFailureMessagePatterns", []))
    ]
    assert matching[0] == action and len(matching) == 1


@pytest.mark.parametrize("case", ["trn1-32xl-x4", "trn1n-32xl-x2", "trn2-48xl-native-x2"])
def test_multi_node_pods_stay_in_one_zone(case):
    files = rendered(case)
    (train,) = files[stage_files()["train"]]
    for pod in _pods(train):
        (term,) = pod["spec"]["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert term["topologyKey"] == "topology.kubernetes.io/zone"
        # The selector matches the pod's own labels, so the first pod can land anywhere and the rest follow.
        assert term["labelSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    for name in (stage_files()["tokenize"], stage_files()["merge"]):
        assert "affinity" not in files[name][0]["spec"]["template"]["spec"]


def test_single_node_jobs_have_no_zone_rule():
    (train,) = rendered("trn1-32xl-x1")[stage_files()["train"]]
    assert all("affinity" not in pod["spec"] for pod in _pods(train))


def test_a_chosen_zone_pins_every_pod():
    docs = _docs("llama31_8b_lora_trn1.yaml", ["cluster.num_nodes=2", "cluster.zone=us-west-2d"])
    pods = [pod for _, doc in docs for pod in _pods(doc)]
    assert pods and all(
        p["spec"]["nodeSelector"]["topology.kubernetes.io/zone"] == "us-west-2d" for p in pods
    )
    assert all("affinity" not in p["spec"] for p in pods)
    assert validate_documents(docs) == []


def test_volcano_gang_schedules_multi_node_jobs_all_or_nothing():
    docs = dict(
        _docs("llama31_8b_lora_trn1.yaml", ["cluster.num_nodes=4", *SCHEDULERS["volcano"], PYTORCHJOB])
    )
    train = docs[stage_files()["train"]]
    assert train["spec"]["runPolicy"]["schedulingPolicy"] == {"minAvailable": 4, "queue": "training"}
    assert {p["spec"]["schedulerName"] for p in _pods(train)} == {"volcano"}
    compile_ = docs[stage_files()["compile"]]
    assert compile_["spec"]["runPolicy"]["schedulingPolicy"]["minAvailable"] == 4
    assert "schedulerName" not in docs[stage_files()["tokenize"]]["spec"]["template"]["spec"]


def test_volcano_gang_schedules_trainjobs_through_their_runtime():
    """Trainer's volcano plugin makes the PodGroup from the runtime's podGroupPolicy, in the queue the
    propagated annotation names; the pods must ask for the volcano scheduler themselves."""
    docs = dict(_docs("llama31_8b_lora_trn1.yaml", ["cluster.num_nodes=4", *SCHEDULERS["volcano"]]))
    runtime = docs["runtime-trnft-trn1-32xlarge-volcano.yaml"]
    assert runtime["spec"]["podGroupPolicy"] == {"volcano": {}}
    for stage in ("compile", "train"):
        job = docs[stage_files()[stage]]
        assert job["spec"]["runtimeRef"]["name"] == "trnft-trn1-32xlarge-volcano"
        template = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]
        assert template["metadata"]["annotations"] == {"scheduling.volcano.sh/queue-name": "training"}
        pods = _pods(job)
        assert len(pods) == 4 and {p["spec"]["schedulerName"] for p in pods} == {"volcano"}


def test_kueue_admits_every_job_from_its_queue():
    docs = _docs("llama31_8b_lora_p5.yaml", ["cluster.num_nodes=2", *SCHEDULERS["kueue"]])
    jobs = [doc for _, doc in docs if doc["kind"] in ("Job", *TRAINING_KINDS)]
    assert len(jobs) == 6 and {d["kind"] for d in jobs} == {"Job", "TrainJob"}
    assert all(doc["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "trn-queue" for doc in jobs)
    assert all("schedulingPolicy" not in doc["spec"].get("runPolicy", {}) for doc in jobs)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["cluster.gang_scheduler=kueue"], "cluster.queue: kueue admits jobs from a LocalQueue"),
        (["cluster.queue=trn-queue"], "'trn-queue' is used only with cluster.gang_scheduler"),
        (["cluster.gang_scheduler=slurm"], "cluster.gang_scheduler"),
        (["cluster.zone=us west"], "cluster.zone"),
        (["cluster.backoff_limit=-1"], "cluster.backoff_limit=-1: must be >= 0"),
        (["cluster.image=repo@sha256:abc"], "'repo@sha256:abc': a digest must be @sha256:"),
        (["cluster.image=Repo Name:1"], "is not an image reference"),
    ],
)
def test_bad_cluster_settings_are_one_line(tmp_path, capsys, overrides, message):
    out = tmp_path / "out"
    code = cli.main(
        ["jobspec", "--config", str(EXAMPLES / "llama31_8b_lora_trn1.yaml"), "--out", str(out), *overrides]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_the_printed_commands_wait_bounded_and_stop_at_a_failure(tmp_path, capsys):
    out = tmp_path / "out"
    example = EXAMPLES / "llama31_8b_lora_trn1.yaml"
    assert cli.main(["jobspec", "--config", str(example), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    lines = [line.strip() for line in printed.splitlines() if line.startswith("  ")]
    assert lines[0] == "kubectl get clustertrainingruntimes.trainer.kubeflow.org/trnft-trn1-32xlarge"
    assert lines[1] == f"kubectl apply -f {out / '00-config.yaml'}"
    for line, stage in zip(lines[2:], stage_files(), strict=True):
        assert re.fullmatch(
            rf"trnft submit {re.escape(str(out / stage_files()[stage]))} --wait --timeout \d+[hd]", line
        )
    assert (
        "--timeout=-1s" not in printed and "is a tag" not in printed
    )  # the example pins its image by digest
    assert (
        f"trnft jobspec --config={example} --runtimes --out runtimes" in printed
    )  # how to render the runtime
    assert (
        cli.main(["jobspec", "--config", str(example), "--out", str(out), "cluster.image=r/trnft:latest"])
        == 0
    )
    assert "note: cluster.image r/trnft:latest is a tag" in capsys.readouterr().out


@pytest.mark.parametrize("grace", [None, 900])
def test_training_pods_get_the_grace_to_save_a_step_after_sigterm(grace):
    """The pod's terminationGracePeriodSeconds covers `trnft torchrun`'s grace for its workers
    (cluster.stop_grace_seconds, default 300) plus 30 s to exit; other stages keep Kubernetes' default."""
    overrides = [
        "cluster.num_nodes=2",
        "cluster.zone=us-west-2a",
        *([f"cluster.stop_grace_seconds={grace}"] if grace else []),
    ]
    seconds = grace or 300
    seen = set()
    for name, doc in _docs("llama31_8b_lora_trn1.yaml", overrides):
        for pod in _pods(doc):
            env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
            if doc["kind"] in TRAINING_KINDS:
                seen.add(name)
                assert pod["spec"]["terminationGracePeriodSeconds"] == seconds + 30
                assert env["TRNFT_STOP_GRACE_S"] == str(seconds)
            else:
                assert "terminationGracePeriodSeconds" not in pod["spec"]
    assert len(seen) == 2  # compile and train


@pytest.mark.parametrize(("instance", "rdma"), [("p5.48xlarge", True), ("g6e.48xlarge", False)])
def test_efa_device_rdma_only_where_the_instance_supports_rdma_read(instance, rdma):
    docs = _docs(
        "llama31_8b_lora_p5.yaml",
        ["cluster.num_nodes=2", "cluster.zone=us-west-2a", f"cluster.instance_type={instance}"],
    )
    (train,) = [d for _, d in docs if d["kind"] in TRAINING_KINDS and d["metadata"]["name"].endswith("train")]
    for pod in _pods(train):
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert env["FI_PROVIDER"] == "efa"
        assert ("FI_EFA_USE_DEVICE_RDMA" in env) is rdma


def test_kueue_with_pytorchjobs_says_the_integration_must_be_enabled(tmp_path, capsys):
    args = ["jobspec", "--config", str(EXAMPLES / "llama31_8b_lora_trn1.yaml"), "--out", str(tmp_path / "o")]
    assert cli.main([*args, "cluster.gang_scheduler=kueue", "cluster.queue=training", PYTORCHJOB]) == 0
    out = capsys.readouterr().out
    assert "kubeflow.org/pytorchjob` integration enabled" in out and "waitForPodsReady" in out
    assert cli.main([*args, "cluster.gang_scheduler=kueue", "cluster.queue=training"]) == 0  # TrainJobs
    out = capsys.readouterr().out
    assert "trainjob integration is on by default" in out and "waitForPodsReady" in out
    assert cli.main(args) == 0  # rendered again without Kueue: no note
    assert "integration enabled" not in capsys.readouterr().out


def test_multi_node_without_a_zone_or_a_gang_scheduler_is_refused(tmp_path, capsys):
    args = ["jobspec", "--config", str(EXAMPLES / "llama31_8b_lora_trn1.yaml"), "--out", str(tmp_path / "o")]
    assert cli.main([*args, "cluster.num_nodes=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cluster.zone" in err[0] and "cluster.gang_scheduler" in err[0]
    assert not (tmp_path / "o").exists()


def test_files_that_are_not_yaml_are_one_line_each(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [unclosed\nb: 1\n")
    args = [
        "jobspec",
        "--config",
        str(EXAMPLES / "smoke.yaml"),
        "--files",
        str(broken),
        str(tmp_path / "no.yaml"),
    ]
    assert cli.main(args) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith(f"{broken} line 2 column 2: not valid YAML (")
    assert out[1] == f"{tmp_path / 'no.yaml'}: cannot be read (No such file or directory)"
    assert out[2] == "2 file(s): 2 problem(s)" and len(out) == 3


def test_the_renderer_names_no_vendor_resource():
    """Device and EFA resource names live in the instance module (one table); render.py takes them from
    there, so a new accelerator kind is a table row, not an edit of the renderer."""
    from pathlib import Path

    from trnft.common.cluster.instances import DEVICE_RESOURCES, EFA_RESOURCE
    from trnft.jobspecs import render

    source = Path(render.__file__).read_text()
    for name in (*DEVICE_RESOURCES.values(), EFA_RESOURCE):
        assert name not in source, name
