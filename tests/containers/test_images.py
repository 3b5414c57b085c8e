"""Images: Dockerfiles parse and COPY only what exists; one Neuron SDK release; ECR logic on moto; dry run."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONTAINERS = REPO / "containers"
SDK = json.loads((CONTAINERS / "neuron-sdk.json").read_text())


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, CONTAINERS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, pending = [], ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "dangling line continuation"
    return out


@pytest.mark.parametrize("kind", ["neuron", "neuron-native", "gpu"])
def test_dockerfile_parses_and_every_copy_source_exists(kind):
    steps = instructions(CONTAINERS / f"Dockerfile.{kind}")
    names = [s[0] for s in steps]
    known = {"ARG", "FROM", "ENV", "COPY", "WORKDIR", "RUN", "ENTRYPOINT", "CMD", "LABEL"}
    assert set(names) <= known, set(names) - known
    assert names[: names.index("FROM")] == ["ARG"] * names.index("FROM")  # only ARGs before FROM
    copies = [shlex.split(args) for word, args in steps if word == "COPY"]
    assert copies
    for parts in copies:
        assert not any(p.startswith("--from") for p in parts)
        for source in parts[:-1]:
            assert (REPO / source).exists(), f"Dockerfile.{kind} copies {source}, which is not in the repo"
    json.loads(next(args for word, args in steps if word == "ENTRYPOINT"))
    # the installer is what keeps the base image's framework packages in place
    assert any(
        word == "RUN" and "install_trnft.py" in args and "--keep torch" in args for word, args in steps
    )


def test_neuron_image_is_one_sdk_release_without_a_driver():
    text = (CONTAINERS / "Dockerfile.neuron").read_text()
    steps = instructions(CONTAINERS / "Dockerfile.neuron")
    base = next(args for word, args in steps if word == "ARG" and args.startswith("NEURON_DLC="))
    assert base.split("=", 1)[1] == SDK["base_image"]
    assert f"sdk{SDK['sdk']}" in SDK["base_image"]
    assert f"'optimum-neuron[training]=={SDK['python_packages']['optimum-neuron']}'" in text
    run_lines = " ".join(args for word, args in steps if word == "RUN")
    assert "dkms" not in run_lines and "apt-get" not in run_lines  # no driver, no extra Neuron debs
    assert "preflight --image-only" in run_lines


@pytest.mark.trn1
def test_the_training_extra_pins_what_neuron_trainer_needs():
    """optimum-neuron's `training` extra (installed by the Neuron image) pins accelerate, peft and trl."""
    import importlib.metadata

    requires = importlib.metadata.requires("optimum-neuron") or []
    training = {r.split(";")[0].replace(" ", "") for r in requires if 'extra == "training"' in r}
    assert {"accelerate==1.8.1", "peft==0.17.0", "trl==0.24.0"} <= training


def _constraint_pins(name: str) -> dict[str, str]:
    lines = (CONTAINERS / "constraints" / name).read_text().splitlines()
    pins = [line.split("==") for line in lines if line and not line.startswith("#")]
    return {re.sub(r"[-_.]+", "-", n).lower(): v for n, v in pins}


def test_gpu_image_is_the_current_line_with_the_vllm_built_for_its_torch():
    """vLLM 0.33.0 requires torch 2.14.0 and transformers >= 5.16.1, < 5.21 (its package metadata); the image's
    base torch, vLLM and the constraints CI installs with agree."""
    steps = instructions(CONTAINERS / "Dockerfile.gpu")
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for w, a in steps if w == "ARG" and "=" in a}
    pins = _constraint_pins("current.txt")
    assert (
        args["CUDA_TORCH_BASE"].startswith(f"pytorch/pytorch:{pins['torch']}-") and pins["torch"] == "2.14.0"
    )
    assert args["VLLM_VERSION"] == "0.33.0" and "5.16.1" <= pins["transformers"] < "5.21"
    run = " ".join(a for w, a in steps if w == "RUN")
    assert "--constraints /opt/trnft/constraints/current.txt" in run and "flash-attn" not in run


def test_each_line_pins_every_dependency_of_trnft():
    """Both constraint files name every runtime and dev dependency (the trn1 image installs each at its pin,
    install_trnft.py --at-versions-of), at the versions that define the line."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = [re.split(r"[\s<>=!~;\[@]", d, maxsplit=1)[0] for d in project["dependencies"]]
    names += [re.split(r"[\s<>=!~;\[@]", d, maxsplit=1)[0] for d in project["optional-dependencies"]["dev"]]
    current, trn1 = _constraint_pins("current.txt"), _constraint_pins("trn1.txt")
    for name in names:
        key = re.sub(r"[-_.]+", "-", name).lower()
        assert key in current and key in trn1, name
    assert (current["torch"], current["transformers"], current["peft"], current["lightning"]) == (
        "2.14.0", "5.20.2", "0.21.2", "2.6.6",
    )  # fmt: skip
    assert (trn1["torch"], trn1["torch-xla"], trn1["transformers"], trn1["peft"], trn1["optimum-neuron"]) == (
        "2.8.0", "2.8.1", "4.57.1", "0.17.0", "0.4.5",
    )  # fmt: skip
    assert "torch-xla" not in current and "optimum-neuron" not in current


def test_installer_keeps_and_skips_base_packages(capsys):
    installer = load("install_trnft")
    deps = ["torch==2.8.0", "torch-xla==2.8.1", "transformers==4.57.1", "peft==0.17.0"]
    assert installer.plan(deps, keep=["torch"], skip=["torch_xla"]) == [
        "transformers==4.57.1",
        "peft==0.17.0",
    ]
    assert (
        installer.main(
            ["--source", str(REPO), "--keep", "torch", "--skip", "torch-xla", "--extra", "x==1", "--dry-run"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (
        "--constraint" in out
        and "x==1" in out
        and "torch-xla" not in out.split("--no-deps")[0].split("--constraint")[1]
    )
    assert "--no-deps" in out


# -- ECR (in-process moto) ------------------------------------------------------------------------------


@pytest.fixture
def aws(monkeypatch):
    from moto import mock_aws

    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-west-2",
    }.items():
        monkeypatch.setenv(key, value)
    with mock_aws():
        yield


def test_ensure_repository_creates_with_scan_on_push_once(aws):
    import boto3

    ecr_helper = load("ecr")
    ecr = boto3.client("ecr", region_name="us-west-2")
    uri, created = ecr_helper.ensure_repository(ecr, "trnft-neuron")
    assert created and uri.endswith(".dkr.ecr.us-west-2.amazonaws.com/trnft-neuron")
    repo = ecr.describe_repositories(repositoryNames=["trnft-neuron"])["repositories"][0]
    assert repo["imageScanningConfiguration"]["scanOnPush"] is True
    assert ecr_helper.ensure_repository(ecr, "trnft-neuron") == (uri, False)


def test_existing_repository_gets_scan_on_push(aws):
    import boto3

    ecr_helper = load("ecr")
    ecr = boto3.client("ecr", region_name="us-west-2")
    ecr.create_repository(repositoryName="old", imageScanningConfiguration={"scanOnPush": False})
    ecr_helper.ensure_repository(ecr, "old")
    assert ecr.describe_repositories(repositoryNames=["old"])["repositories"][0][
        "imageScanningConfiguration"
    ]["scanOnPush"]


def test_login_and_account(aws, capsys):
    import boto3

    ecr_helper = load("ecr")
    user, password, registry = ecr_helper.login(boto3.client("ecr", region_name="us-west-2"))
    assert user == "AWS" and password and registry.endswith(".amazonaws.com")
    assert ecr_helper.account_id(boto3.session.Session()) == "123456789012"
    assert ecr_helper.main(["ensure-repository", "--region", "us-west-2", "--name", "trnft-gpu"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == "123456789012.dkr.ecr.us-west-2.amazonaws.com/trnft-gpu"
    assert "created repository trnft-gpu" in out.err


# -- build-and-push.sh --dry-run ------------------------------------------------------------------------


def _checkout(tmp_path: Path) -> Path:
    """A committed git checkout holding the image scripts (the script tags images with its git SHA)."""
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(CONTAINERS, repo / "containers")
    git = ["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci", "-C", str(repo)]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "images"], check=True)
    return repo


def _build_and_push(repo: Path, tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    marker = tmp_path / "called"
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    for tool in ("docker", "aws"):
        (fake / tool).write_text(f"#!/bin/sh\necho {tool} >> {marker}\nexit 1\n")
        (fake / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "PYTHON": sys.executable}
    proc = subprocess.run(
        [str(repo / "containers" / "build-and-push.sh"), *args], capture_output=True, text=True, env=env
    )
    return proc, marker


def test_dry_run_prints_every_step_in_order_and_runs_nothing(tmp_path):
    repo = _checkout(tmp_path)
    args = ("gpu", "--region", "eu-west-1", "--account", "111122223333", "--tag", "stable", "--dry-run")
    proc, marker = _build_and_push(repo, tmp_path, *args)
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists(), "dry run called docker or aws"
    steps = [line[4:].split()[0:2] for line in proc.stdout.splitlines() if line.startswith("==> ")]
    assert steps == [
        ["ensure", "ECR"],
        ["docker", "login"],
        ["docker", "build"],
        ["docker", "tag"],
        ["docker", "push"],
        ["docker", "push"],
    ]
    sha = subprocess.run(
        ["git", "rev-parse", "--short=12", "HEAD"], cwd=repo, capture_output=True, text=True
    ).stdout.strip()
    image = next(line for line in proc.stdout.splitlines() if line.startswith("image: "))
    assert image.startswith(f"image: 111122223333.dkr.ecr.eu-west-1.amazonaws.com/trnft-gpu:{sha}")
    dry = [line for line in proc.stdout.splitlines() if line.startswith("DRY-RUN: ")]
    assert any("Dockerfile.gpu" in line and "docker build" in line for line in dry)
    assert any(line.endswith(":stable") and "docker push" in line for line in dry)
    assert "set cluster.image: 111122223333.dkr.ecr.eu-west-1.amazonaws.com/trnft-gpu@sha256:" in proc.stdout


def test_a_dirty_tree_is_refused_unless_allowed(tmp_path):
    repo = _checkout(tmp_path)
    (repo / "containers" / "entrypoint.sh").write_text('#!/bin/sh\nexec "$@"\n')
    proc, _ = _build_and_push(repo, tmp_path, "neuron", "--region", "us-west-2", "--dry-run")
    assert proc.returncode == 1
    assert "uncommitted changes (containers/entrypoint.sh)" in proc.stderr and "--allow-dirty" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "==> docker" not in proc.stdout
    proc, _ = _build_and_push(repo, tmp_path, "neuron", "--region", "us-west-2", "--dry-run", "--allow-dirty")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^image: \S+/trnft-neuron:[0-9a-f]{12}-dirty$", proc.stdout, re.M), proc.stdout


def test_account_must_be_an_account_id(tmp_path):
    repo = _checkout(tmp_path)
    proc, _ = _build_and_push(repo, tmp_path, "gpu", "--region", "us-west-2", "--account", "dev", "--dry-run")
    assert proc.returncode == 1 and "--account 'dev' is not a 12-digit AWS account ID" in proc.stderr


def test_account_must_match_the_credentials(aws, capsys):
    ecr_helper = load("ecr")
    assert ecr_helper.main(["account", "--expect", "111122223333"]) == 1
    err = capsys.readouterr().err
    assert "credentials are for account 123456789012, --account says 111122223333" in err
    assert ecr_helper.main(["account", "--expect", "123456789012"]) == 0
    assert capsys.readouterr().out.strip() == "123456789012"


# -- the GPU image's EFA stack and its build-time check ---------------------------------------------------


def test_gpu_image_brings_efa_and_checks_the_nccl_plugin_at_build_time():
    steps = instructions(CONTAINERS / "Dockerfile.gpu")
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for w, a in steps if w == "ARG" and "=" in a}
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["EFA_INSTALLER_VERSION"])  # pinned, never "latest"
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["AWS_OFI_NCCL_VERSION"])
    runs = [a for w, a in steps if w == "RUN"]
    efa = next(r for r in runs if "efa_installer.sh" in r)
    assert "--skip-kmod" in efa and "aws-efa-installer-${EFA_INSTALLER_VERSION}" in efa  # no host driver
    assert "--with-libfabric=/opt/amazon/efa" in efa and "aws-ofi-nccl-${AWS_OFI_NCCL_VERSION}" in efa
    env = " ".join(a for w, a in steps if w == "ENV")
    assert "/opt/aws-ofi-nccl/lib" in env and "/opt/amazon/efa/lib" in env and "FI_PROVIDER=efa" in env
    # The check runs after everything is installed, in the last RUN that installs Python packages.
    assert "check_nccl_net.py --dir /opt/aws-ofi-nccl/lib" in runs[-1]
    assert runs.index(efa) < len(runs) - 1


def _shared_library(folder: Path, name: str, symbol: str) -> Path:
    import shutil

    if shutil.which("cc") is None:
        pytest.skip("no C compiler to build a test library")
    source = folder / "plugin.c"
    source.write_text(f"int {symbol} = 1;\n")
    library = folder / name
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    return library


def test_nccl_plugin_check_loads_the_library_and_finds_the_interface(tmp_path, capsys, monkeypatch):
    check = load("check_nccl_net")
    monkeypatch.setenv("LD_LIBRARY_PATH", "")
    assert check.main(["--dir", str(tmp_path)]) == 1
    assert "no NCCL network plugin" in capsys.readouterr().err

    _shared_library(tmp_path, "libnccl-net.so", "unrelated_symbol")
    assert check.main(["--dir", str(tmp_path)]) == 1
    assert "exports no ncclNetPlugin_v<N> symbol" in capsys.readouterr().err

    good = tmp_path / "good"
    good.mkdir()
    _shared_library(good, "libnccl-net-ofi.so", "ncclNetPlugin_v8")
    assert check.main(["--dir", str(good)]) == 0
    assert "NCCL net plugin loads (interfaces v8)" in capsys.readouterr().out

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "libnccl-net.so").write_bytes(b"not an ELF file")
    assert check.main(["--dir", str(broken)]) == 1
    assert "does not load" in capsys.readouterr().err


def test_dockerignore_keeps_the_context_small_and_every_copy_source_in():
    import fnmatch

    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for heavy in (".git", ".venv", "tests"):
        assert heavy in patterns
    for kind in ("neuron", "neuron-native", "gpu"):
        for word, args in instructions(CONTAINERS / f"Dockerfile.{kind}"):
            if word != "COPY":
                continue
            for source in shlex.split(args)[:-1]:
                top = source.rstrip("/").split("/")[0]
                assert not any(fnmatch.fnmatch(top, p) for p in patterns), f"{source} is ignored"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tpu"], "first argument must be neuron, neuron-native or gpu"),
        (["neuron", "--bogus"], "unknown option --bogus"),
    ],
)
def test_bad_arguments(args, message):
    proc = subprocess.run([str(CONTAINERS / "build-and-push.sh"), *args], capture_output=True, text=True)
    assert proc.returncode != 0 and message in proc.stderr


# -- startup check ----------------------------------------------------------------------------------------


def _readings(**changes):
    from trnft.neuron.preflight import Readings

    found = Readings(
        python_packages=dict(SDK["python_packages"]),
        system_packages=dict(SDK["system_packages"]),
        driver="2.24.7.0",
    )
    for key, value in changes.items():
        if key == "driver":
            found.driver = value
        elif key in found.python_packages:
            found.python_packages[key] = value
        else:
            found.system_packages[key] = value
    return found


def test_preflight_passes_when_everything_belongs_to_the_release():
    from trnft.neuron.preflight import check

    assert check(SDK, _readings(), check_driver=True) == []
    assert check(SDK, _readings(driver="2.25.1.0"), check_driver=True) == []


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"neuronx-cc": "2.22.1.0"},
            "neuronx-cc 2.22.1.0 is in the image, but it is built for Neuron SDK 2.26.1 (neuronx-cc 2.21.33363.0)",
        ),
        ({"aws-neuronx-runtime-lib": "2.29.40.0"}, "aws-neuronx-runtime-lib 2.29.40.0 is in the image"),
        (
            {"driver": "2.19.64.0"},
            "Neuron driver 2.19.64.0 on this host is older than 2.24.7.0, which runtime 2.28.23.0 of Neuron SDK 2.26.1 needs: upgrade aws-neuronx-dkms",
        ),
        ({"driver": None}, "cannot read the Neuron driver version"),
        ({"neuronx-distributed": None}, "neuronx-distributed is not installed"),
    ],
)
def test_preflight_says_what_to_fix(changes, message):
    from trnft.neuron.preflight import check

    problems = check(SDK, _readings(**changes), check_driver=True)
    assert len(problems) == 1 and message in problems[0]


# What the Neuron training DLC 2.26.1 really reports: PEP 440 local labels on the Python packages, Debian
# revisions on the system packages. All of them belong to SDK 2.26.1.
DLC_2_26_1 = {
    "neuronx-cc": "2.21.33363.0+82129205",
    "neuronx-distributed": "0.15.22404+1f27bddf",
    "torch-neuronx": "2.8.0.2.10.16998+e9bf8a50",
    "libneuronxla": "2.2.12677.0",
    "optimum-neuron": "0.4.5",
    "aws-neuronx-runtime-lib": "2.28.23.0-dd5879008",
    "aws-neuronx-collectives": "2.28.27.0-bc30ece58",
}


def test_preflight_accepts_the_version_strings_the_dlc_ships():
    from trnft.neuron.preflight import check

    assert check(SDK, _readings(**DLC_2_26_1), check_driver=True) == []
    assert check(SDK, _readings(**DLC_2_26_1, driver="2.24.7.0"), check_driver=True) == []


@pytest.mark.parametrize(
    ("package", "other_release"),
    [
        ("torch-neuronx", "2.8.0.2.9.9357+7ee2cf16"),  # the torch-neuronx of an older SDK
        ("neuronx-cc", "2.21.18209.0+043b1bf7"),
        ("neuronx-distributed", "0.14.18461+ac7d1b7b"),
        ("aws-neuronx-runtime-lib", "2.27.23.0-8deec4dbf"),
        ("aws-neuronx-collectives", "2.27.34.0-ec8cd5e8b"),
    ],
)
def test_preflight_refuses_a_mixed_sdk(package, other_release):
    from trnft.neuron.preflight import check

    problems = check(SDK, _readings(**{**DLC_2_26_1, package: other_release}), check_driver=True)
    assert len(problems) == 1 and problems[0].startswith(f"{package} {other_release} is in the image")
    assert "mixes Neuron releases" in problems[0]


@pytest.mark.parametrize(
    ("actual", "expected", "same"),
    [
        ("2.8.0.2.10.16998+e9bf8a50", "2.8.0.2.10.16998", True),
        ("2.28.23.0-dd5879008", "2.28.23.0", True),
        ("1:2.28.23.0-dd5879008", "2.28.23.0", True),
        ("2.8.0.2.10.169989850", "2.8.0.2.10.16998", False),  # what folding the label into digits gave
        ("2.8.0.2.10.16998", "2.8.0.2.10.16999", False),
        ("not-a-version", "2.28.23.0", False),
    ],
)
def test_versions_compare_by_release(actual, expected, same):
    from trnft.neuron.preflight import same_release

    assert same_release(actual, expected) is same


def test_preflight_command_passes_on_the_dlc_packages(tmp_path):
    """The Dockerfile's own check (``--image-only``) against packages reporting the DLC's exact versions."""
    site = tmp_path / "site"
    for name, version in DLC_2_26_1.items():
        if name.startswith("aws-"):
            continue
        info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    dpkg = bin_dir / "dpkg-query"  # stands in for the image's Debian package database
    cases = "\n".join(f'  *{n}) printf %s "{v}";;' for n, v in DLC_2_26_1.items() if n.startswith("aws-"))
    dpkg.write_text(f'#!/bin/sh\ncase "$*" in\n{cases}\n  *) exit 1;;\nesac\n')
    dpkg.chmod(0o755)
    proc = _image_preflight(
        PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    )
    assert proc.returncode == 0, proc.stderr
    assert "match" in proc.stdout


def _image_preflight(**env: str) -> subprocess.CompletedProcess:
    """The Dockerfile's own check: ``python -m trnft.neuron.preflight --image-only`` with the image's manifest."""
    cmd = [
        sys.executable,
        "-m",
        "trnft.neuron.preflight",
        "--image-only",
        "--manifest",
        str(CONTAINERS / "neuron-sdk.json"),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})


def test_preflight_command_fails_in_a_non_neuron_environment():
    proc = _image_preflight()
    assert proc.returncode == 1
    assert "neuronx-cc is not installed" in proc.stderr


def test_the_gpu_check_installs_the_current_lines_versions():
    """benchmarks/gpu_check.sh and gpu_wheels.sh take their packages from benchmarks/gpu_site_pins.sh: each
    name of gpu_site.txt at current.txt's version, never a version of their own."""
    import subprocess

    out = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_site_pins.sh")], capture_output=True, text=True, check=True
    ).stdout.split()
    pins = _constraint_pins("current.txt")
    names = [n for n in (REPO / "benchmarks" / "gpu_site.txt").read_text().split("\n") if n and n[0] != "#"]
    assert len(out) == len(names)
    for line in out:
        name, version = line.split("==")
        assert pins[re.sub(r"[-_.]+", "-", name).lower()] == version
    assert "transformers==5.20.2" in out and "lightning==2.6.6" in out
    for script in ("gpu_check.sh", "gpu_wheels.sh"):
        text = (REPO / "benchmarks" / script).read_text()
        assert "gpu_site_pins.sh" in text and "peft==" not in text


def test_the_ray_extra_is_pinned_and_the_images_that_run_rayjobs_install_that_ray():
    """cluster.operator: rayjob starts Ray from the training image (KubeRay runs `ray start` in it): the gpu and
    neuron-native images install the [ray] extra's Ray, at the current line's pin; trn1's image has none."""
    import tomllib

    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["ray"]
    assert extra == ["ray[default,train]==2.60.0"]
    assert _constraint_pins("current.txt")["ray"] == "2.60.0"
    for kind in ("gpu", "neuron-native"):
        steps = instructions(CONTAINERS / f"Dockerfile.{kind}")
        args = {a.split("=", 1)[0]: a.split("=", 1)[1] for w, a in steps if w == "ARG" and "=" in a}
        run = " ".join(a for w, a in steps if w == "RUN")
        assert args["RAY_VERSION"] == "2.60.0" and '"ray[default,train]==${RAY_VERSION}"' in run, kind
    assert "ray" not in " ".join(a for w, a in instructions(CONTAINERS / "Dockerfile.neuron") if w == "RUN")
