"""`trnft submit` and `trnft wait` decide on recorded Job and PyTorchJob status objects: complete, failed,
still running, timeout; a rerun deletes the finished job (foreground cascading) before it applies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trnft.common import cli
from trnft.common.errors import TrnftError
from trnft.jobspecs.operate import (
    CREATION_GRACE_S,
    EXIT_FAILED,
    EXIT_KUBECTL,
    EXIT_TIMEOUT,
    JobRef,
    KubectlError,
    job_state,
    parse_duration,
    read_job_ref,
    submit,
    wait,
)

STATUS = Path(__file__).parent / "status"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "llama31_8b_lora_trn1.yaml"


def recorded(name: str) -> dict:
    return json.loads((STATUS / f"{name}.json").read_text())


@pytest.mark.parametrize(
    ("name", "phase", "words"),
    [
        ("job-running", "running", "1 pod(s) running"),
        ("job-retrying", "running", "1 failed attempt(s) so far"),
        ("job-complete", "succeeded", "complete at 2026-11-30T10:04:12Z"),
        ("job-failed-permanent", "failed", "PodFailurePolicy: Container pytorch for pod"),
        ("job-failed-backoff", "failed", "BackoffLimitExceeded"),
        ("job-suspended", "waiting", "suspended"),
        ("pytorchjob-created", "waiting", "pods not running yet"),
        ("pytorchjob-running", "running", "4 pod(s) running"),
        ("pytorchjob-restarting", "running", "restarting after a retryable failure"),
        ("pytorchjob-succeeded", "succeeded", "succeeded"),
        ("pytorchjob-failed", "failed", "PyTorchJobFailed: PyTorchJob llama31-8b-lora-train is failed"),
        ("trainjob-created", "waiting", "pods not running yet"),
        ("trainjob-suspended", "waiting", "suspended"),
        ("trainjob-starting", "running", "1 child job(s) active, pods starting"),
        ("trainjob-running", "running", "1 child job(s) with every pod ready"),
        ("trainjob-complete", "succeeded", "complete"),
        ("trainjob-failed-permanent", "failed", "FailJobSetAction: jobset failed due to FailJobSet action"),
        ("trainjob-failed-restarts", "failed", "ReachedMaxRestarts: jobset failed due to reaching max"),
    ],
)
def test_job_state_of_every_recorded_status(name, phase, words):
    state = job_state(recorded(name))
    assert state.phase == phase and words in state.detail, state


class FakeKubectl:
    """Answers `kubectl get` with recorded objects in turn (the last one repeats); records every call.

    The job's own resource answers from ``gets``; a TrainJob's JobSet, events and Kueue Workloads from
    ``jobset``, ``events`` and ``workloads`` (recorded names, each a queue like ``gets``)."""

    def __init__(
        self,
        *gets: str | None,
        fail: dict[str, str] | None = None,
        pods=None,
        jobset: tuple[str | None, ...] = ("jobset-running",),
        events: tuple[str, ...] = ("events-none",),
        workloads: tuple[str, ...] = ("workloads-pending",),
    ) -> None:
        """``gets``: recorded object names, None (NotFound) or ``"!<stderr>"`` (kubectl fails so)."""
        self.gets = list(gets)
        self.calls: list[list[str]] = []
        self.fail = fail or {}
        self.pods = pods or []
        self.others = {
            "jobsets.jobset.x-k8s.io": list(jobset),
            "events": list(events),
            "workloads.kueue.x-k8s.io": list(workloads),
        }

    @staticmethod
    def _answer(args, queue):
        if queue and isinstance(queue[0], str) and queue[0].startswith("!"):
            return subprocess.CompletedProcess(args, 1, "", queue.pop(0)[1:])
        name = queue.pop(0) if len(queue) > 1 else queue[0]
        if name is None:
            return subprocess.CompletedProcess(args, 1, "", 'Error from server (NotFound): "x" not found')
        return subprocess.CompletedProcess(args, 0, json.dumps(recorded(name)), "")

    def __call__(self, args):
        self.calls.append(list(args))
        verb = args[0]
        if verb in self.fail:
            return subprocess.CompletedProcess(args, 1, "", self.fail[verb])
        if verb == "get" and args[1] == "pods":
            return subprocess.CompletedProcess(args, 0, json.dumps({"items": self.pods}), "")
        if verb == "get":
            resource = args[1].split("/")[0]
            return self._answer(args, self.others.get(resource, self.gets))
        return subprocess.CompletedProcess(args, 0, f"{args[-1]} {verb}d\n", "")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


JOB = JobRef("Job", "llama31-8b-lora-tokenize", "default", Path("01-tokenize.yaml"))
TRAIN = JobRef("PyTorchJob", "llama31-8b-lora-train", "ml", Path("03-train.yaml"))
TRAINJOB = JobRef("TrainJob", "llama31-8b-lora-train", "ml", Path("03-train.yaml"))


def _wait(ref, kubectl, timeout_s=3600.0, interval_s=20.0):
    clock, lines = Clock(), []
    code = wait(
        ref,
        timeout_s=timeout_s,
        interval_s=interval_s,
        log=lines.append,
        kubectl=kubectl,
        clock=clock,
        sleep=clock.sleep,
    )
    return code, lines, clock.now


def test_wait_returns_0_when_the_job_completes():
    kubectl = FakeKubectl("job-running", "job-running", "job-complete")
    code, lines, waited = _wait(JOB, kubectl)
    assert code == 0 and waited == 40.0
    assert len(lines) == 2 and "running" in lines[0] and "succeeded" in lines[1]  # one line per change
    assert kubectl.calls[0] == ["get", "jobs.batch/llama31-8b-lora-tokenize", "-n", "default", "-o", "json"]


def test_wait_returns_non_zero_as_soon_as_the_job_fails():
    code, lines, waited = _wait(JOB, FakeKubectl("job-running", "job-failed-permanent"))
    assert code == EXIT_FAILED and waited == 20.0  # the next look, not the timeout
    assert "exit code 2 matching FailJob" in lines[-2]
    assert "kubectl logs -n default job/llama31-8b-lora-tokenize" in lines[-1]
    assert "trnft submit 01-tokenize.yaml" in lines[-1]


def test_wait_follows_a_pytorchjob_through_a_restart_to_its_end():
    kubectl = FakeKubectl(
        "pytorchjob-created", "pytorchjob-running", "pytorchjob-restarting", "pytorchjob-succeeded"
    )
    code, lines, _ = _wait(TRAIN, kubectl)
    assert code == 0 and [line.split(": ")[1] for line in lines] == [
        "waiting",
        "running",
        "running",
        "succeeded",
    ]
    assert kubectl.calls[0][1] == "pytorchjobs.kubeflow.org/llama31-8b-lora-train"
    code, lines, _ = _wait(TRAIN, FakeKubectl("pytorchjob-running", "pytorchjob-failed"))
    assert code == EXIT_FAILED and "kubectl logs -n ml llama31-8b-lora-train-master-0" in lines[-1]


def test_wait_follows_a_trainjob_from_admission_to_its_end():
    kubectl = FakeKubectl(
        "trainjob-suspended", "trainjob-starting", "trainjob-running", "trainjob-running", "trainjob-complete"
    )
    code, lines, waited = _wait(TRAINJOB, kubectl)
    assert code == 0 and waited == 80.0
    assert [line.split(": ")[1] for line in lines] == ["waiting", "running", "running", "succeeded"]
    assert kubectl.calls[0] == [
        "get",
        "trainjobs.trainer.kubeflow.org/llama31-8b-lora-train",
        "-n",
        "ml",
        "-o",
        "json",
    ]


def test_a_failed_trainjob_names_its_failed_pod_found_by_the_jobset_label():
    failed_pod = {
        "metadata": {"name": "llama31-8b-lora-train-node-0-2-x7k2p"},
        "status": {"phase": "Failed", "containerStatuses": [{"state": {"terminated": {"exitCode": 2}}}]},
    }
    kubectl = FakeKubectl("trainjob-running", "trainjob-failed-permanent", pods=[failed_pod])
    code, lines, _ = _wait(TRAINJOB, kubectl)
    assert code == EXIT_FAILED and "pod llama31-8b-lora-train-node-0-2-x7k2p failed" in lines[-1]
    assert kubectl.calls[-1][-3] == "jobset.sigs.k8s.io/jobset-name=llama31-8b-lora-train"
    # Pods already gone: the hint reads the logs of the JobSet's pods by label.
    code, lines, _ = _wait(TRAINJOB, FakeKubectl("trainjob-failed-restarts"))
    assert code == EXIT_FAILED
    assert "kubectl logs -n ml -l jobset.sigs.k8s.io/jobset-name=llama31-8b-lora-train --prefix" in lines[-1]


def test_wait_is_bounded():
    code, lines, waited = _wait(JOB, FakeKubectl("job-retrying"), timeout_s=300, interval_s=120)
    assert code == EXIT_TIMEOUT and waited == 300.0
    assert "still running after 5m (--timeout); the job keeps running" in lines[-1]


def test_wait_for_a_job_that_does_not_exist_is_one_error():
    with pytest.raises(TrnftError, match="not found in the cluster; submit it first"):
        _wait(JOB, FakeKubectl(None))
    with pytest.raises(
        TrnftError, match=r"kubectl get jobs\.batch/llama31-8b-lora-tokenize failed .*forbidden"
    ):
        _wait(
            JOB,
            FakeKubectl(
                "job-running", fail={"get": "Error from server (Forbidden): jobs.batch is forbidden"}
            ),
        )


REFUSED = "!The connection to the server 10.0.0.1:443 was refused - did you specify the right host or port?"
UNAUTHORIZED = "!error: You must be logged in to the server (Unauthorized)"


def test_wait_rides_out_a_flapping_api_server_and_an_expiring_token():
    kubectl = FakeKubectl("job-running", REFUSED, REFUSED, UNAUTHORIZED, "job-running", "job-complete")
    code, lines, waited = _wait(JOB, kubectl)
    assert code == 0
    retries = [line for line in lines if "retrying in" in line]
    assert len(retries) == 3 and "attempt 1" in retries[0] and "attempt 3" in retries[2]
    assert waited == 20 + 20 + 40 + 80 + 20  # the pauses double while kubectl fails, then the interval again


def test_a_transient_failure_that_lasts_past_the_timeout_ends_the_wait_with_124():
    code, lines, waited = _wait(JOB, FakeKubectl(*[REFUSED] * 50), timeout_s=600)
    assert code == EXIT_TIMEOUT and waited == 600
    assert "kubectl kept failing until --timeout" in lines[-1]


@pytest.mark.parametrize(
    ("answers", "words"),
    [
        ([UNAUTHORIZED] * 5, "Unauthorized"),  # three in a row: the credential is wrong, not expiring
        (
            ["!Unable to connect to the server: getting credentials: exec: executable aws not found"],
            "aws not found",
        ),
        (['!error: error loading config file "/root/.kube/config": open: no such file'], "loading config"),
    ],
)
def test_broken_cluster_access_is_its_own_exit_code_not_a_failed_job(answers, words):
    with pytest.raises(KubectlError, match=words) as info:
        _wait(JOB, FakeKubectl(*answers))
    assert info.value.exit_code == EXIT_KUBECTL and "not found in the cluster" not in str(info.value)


def test_the_failure_hint_names_the_pod_that_failed():
    """cleanPodPolicy: Running deleted the running Master when Worker 1 failed: name the Worker's pod."""
    worker = {
        "metadata": {"name": "llama31-8b-lora-train-worker-1"},
        "status": {
            "phase": "Failed",
            "containerStatuses": [
                {"state": {"terminated": {"exitCode": 2, "finishedAt": "2026-12-04T10:00:00Z"}}}
            ],
        },
    }
    healthy = {"metadata": {"name": "llama31-8b-lora-train-worker-0"}, "status": {"phase": "Running"}}
    kubectl = FakeKubectl("pytorchjob-running", "pytorchjob-failed", pods=[healthy, worker])
    code, lines, _ = _wait(TRAIN, kubectl)
    assert code == EXIT_FAILED
    assert "pod llama31-8b-lora-train-worker-1 failed" in lines[-1]
    assert "kubectl logs -n ml llama31-8b-lora-train-worker-1" in lines[-1]
    assert kubectl.calls[-1] == [
        "get", "pods", "-n", "ml", "-l", "training.kubeflow.org/job-name=llama31-8b-lora-train", "-o", "json"
    ]  # fmt: skip


def test_submit_applies_a_new_job():
    kubectl = FakeKubectl(None)
    submit(JOB, JOB.file, log=lambda _: None, kubectl=kubectl)
    assert [c[0] for c in kubectl.calls] == ["get", "apply"]


@pytest.mark.parametrize("finished", ["job-failed-permanent", "job-complete"])
def test_a_rerun_deletes_the_finished_job_with_its_pods_then_applies(finished):
    kubectl, lines = FakeKubectl(finished), []
    submit(JOB, JOB.file, log=lines.append, kubectl=kubectl)
    assert [c[0] for c in kubectl.calls] == ["get", "delete", "apply"]
    delete = kubectl.calls[1]
    assert delete[1] == "jobs.batch/llama31-8b-lora-tokenize" and "--cascade=foreground" in delete
    assert "--wait=true" in delete and "deleting it and its pods" in lines[0]


@pytest.mark.parametrize(
    ("active", "jobset"),
    [
        ("job-running", None),
        ("pytorchjob-restarting", None),
        ("trainjob-running", "jobset-running"),
        ("trainjob-starting", "jobset-restarting"),
    ],
)
def test_a_job_still_running_is_never_replaced(active, jobset):
    kubectl = FakeKubectl(active, jobset=(jobset,))
    ref = {"pytorchjob": TRAIN, "trainjob": TRAINJOB}.get(active.split("-")[0], JOB)
    with pytest.raises(TrnftError, match=r"still (running|waiting).*trnft wait"):
        submit(ref, JOB.file, log=print, kubectl=kubectl)
    assert [c[0] for c in kubectl.calls] == ["get"] * len(kubectl.calls)


@pytest.mark.parametrize(
    ("never_started", "ref", "extra"),
    [
        ("job-suspended", JOB, {}),
        ("trainjob-suspended", TRAINJOB, {}),
        ("trainjob-suspended-kueue", TRAINJOB, {}),
        # Its JobSet was denied: the TrainJob exists, nothing else ever will.
        ("trainjob-created", TRAINJOB, {"jobset": (None,), "events": ("events-creation-failed",)}),
    ],
)
def test_a_job_that_never_started_is_replaced(never_started, ref, extra):
    kubectl, lines = FakeKubectl(never_started, **extra), []
    submit(ref, ref.file, log=lines.append, kubectl=kubectl)
    assert [c[0] for c in kubectl.calls if c[0] != "get"] == ["delete", "apply"]
    assert "never started" in lines[0], lines


def test_the_config_map_is_just_applied(tmp_path):
    assert cli.main(["jobspec", "--config", str(EXAMPLE), "--out", str(tmp_path / "out")]) == 0
    ref, docs = read_job_ref(tmp_path / "out" / "00-config.yaml")
    assert ref is None and docs[0]["kind"] == "ConfigMap"
    kubectl = FakeKubectl(None)
    submit(ref, tmp_path / "out" / "00-config.yaml", log=lambda _: None, kubectl=kubectl)
    assert [c[0] for c in kubectl.calls] == ["apply"]
    ref, _ = read_job_ref(tmp_path / "out" / "03-train.yaml")
    assert ref == JobRef("TrainJob", "llama31-8b-lora-train", "default", tmp_path / "out" / "03-train.yaml")


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("45s", 45), ("30m", 1800), ("2h", 7200), ("1d12h", 129600)]
)
def test_durations(text, seconds):
    assert parse_duration(text, "--timeout") == seconds


@pytest.mark.parametrize("text", ["", "soon", "0", "-5m", "2h30"])
def test_bad_durations_are_one_line(text):
    with pytest.raises(TrnftError, match="--timeout: "):
        parse_duration(text, "--timeout")


# -- the commands, with a kubectl on PATH that serves recorded objects -----------------------------------

FAKE_KUBECTL = """#!{python}
import json, os, sys
state = os.environ["FAKE_KUBECTL_STATE"]
with open(os.path.join(state, "calls.jsonl"), "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
queue = json.load(open(os.path.join(state, "gets.json")))
others_file = os.path.join(state, "others.json")
others = json.load(open(others_file)) if os.path.exists(others_file) else {{}}
resource = sys.argv[2].split("/")[0] if len(sys.argv) > 2 else ""
if sys.argv[1] == "get" and resource in others:
    name = others[resource]
elif sys.argv[1] == "get":
    name = queue.pop(0) if len(queue) > 1 else queue[0]
    json.dump(queue, open(os.path.join(state, "gets.json"), "w"))
if sys.argv[1] == "get":
    if name is None:
        sys.stderr.write('Error from server (NotFound): jobs.batch "x" not found\\n')
        sys.exit(1)
    sys.stdout.write(open(os.path.join({status!r}, name + ".json")).read())
else:
    print(sys.argv[-1], sys.argv[1] + "d")
"""


def _with_fake_kubectl(tmp_path, gets, others=None):
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    bin_dir.mkdir()
    state.mkdir()
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(FAKE_KUBECTL.format(python=sys.executable, status=str(STATUS)))
    kubectl.chmod(0o755)
    (state / "gets.json").write_text(json.dumps(gets))
    (state / "others.json").write_text(json.dumps(others or {}))
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_KUBECTL_STATE": str(state),
    }
    return env, state


def _trnft(env, *args):
    return subprocess.run(
        [sys.executable, "-m", "trnft.common.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_submit_and_wait_through_kubectl(tmp_path):
    assert cli.main(["jobspec", "--config", str(EXAMPLE), "--out", str(tmp_path / "out")]) == 0
    spec = tmp_path / "out" / "01-tokenize.yaml"
    env, state = _with_fake_kubectl(tmp_path, [None, "job-running", "job-failed-permanent"])
    proc = _trnft(env, "submit", str(spec), "--wait", "--interval", "1s", "--timeout", "1m")
    assert proc.returncode == EXIT_FAILED, proc.stderr
    calls = [json.loads(line) for line in (state / "calls.jsonl").read_text().splitlines()]
    assert [c[0] for c in calls] == ["get", "apply", "get", "get", "get"]  # the last: the job's pods
    assert calls[-1][1] == "pods"
    assert "PodFailurePolicy" in proc.stdout and "trnft submit" in proc.stdout

    # The rerun after the fix: the failed job is deleted with its pods, applied again, and completes.
    (state / "calls.jsonl").unlink()
    (state / "gets.json").write_text(json.dumps(["job-failed-permanent", "job-running", "job-complete"]))
    proc = _trnft(env, "submit", str(spec), "--wait", "--interval", "1s")
    assert proc.returncode == 0, proc.stderr
    calls = [json.loads(line) for line in (state / "calls.jsonl").read_text().splitlines()]
    assert [c[0] for c in calls] == ["get", "delete", "apply", "get", "get"]

    (state / "gets.json").write_text(json.dumps(["job-running"]))
    proc = _trnft(env, "wait", str(spec), "--interval", "1s", "--timeout", "2s")
    assert proc.returncode == EXIT_TIMEOUT and "still running after 2s" in proc.stdout


def test_commands_without_kubectl_or_spec_are_one_line(tmp_path, capsys, monkeypatch):
    assert cli.main(["wait", str(tmp_path / "missing.yaml")]) == 1
    assert "no such spec file; render the specs with `trnft jobspec` first" in capsys.readouterr().err
    assert cli.main(["jobspec", "--config", str(EXAMPLE), "--out", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert cli.main(["wait", str(tmp_path / "out" / "01-tokenize.yaml")]) == EXIT_KUBECTL
    err = capsys.readouterr().err
    assert "kubectl is not on PATH" in err and err.count("\n") == 1


# -- what a TrainJob's own status cannot say (Trainer v2.3.0, Kueue v0.17, JobSet v0.12.0) ----------------

CREATED = 1_796_032_800.0  # 2026-11-30T10:00:00Z, trainjob-created's creationTimestamp


def _wait_at(ref, kubectl, start_age_s, timeout_s=3600.0):
    """``_wait`` with the wall clock ``start_age_s`` after the TrainJob's creation when the wait begins."""
    clock, lines = Clock(), []
    code = wait(
        ref,
        timeout_s=timeout_s,
        interval_s=20.0,
        log=lines.append,
        kubectl=kubectl,
        clock=clock,
        sleep=clock.sleep,
        now=lambda: CREATED + start_age_s + clock.now,
    )
    return code, lines, clock.now


def test_a_trainjob_whose_jobset_was_denied_fails_after_the_grace_naming_the_event():
    kubectl = FakeKubectl("trainjob-created", jobset=(None,), events=("events-creation-failed",))
    code, lines, waited = _wait_at(TRAINJOB, kubectl, start_age_s=0)
    assert code == EXIT_FAILED
    assert waited == CREATION_GRACE_S  # waits for the controller's retries, then fails, not at --timeout
    assert "JobSet not created yet (latest event: TrainJob resources reconciliation failed" in lines[0]
    failed = [line for line in lines if ": failed: " in line]
    assert len(failed) == 1 and "TrainJobResourcesCreationFailed" in failed[0]
    assert "invalid failure policy rule name 'permanent-exit'" in failed[0]
    assert "before any pod existed" in lines[-1] and "trnft submit 03-train.yaml" in lines[-1]
    # The events were asked for by the TrainJob's name and the controller's reason.
    (events,) = {tuple(c) for c in kubectl.calls if c[1] == "events"}
    assert "involvedObject.kind=TrainJob,involvedObject.name=llama31-8b-lora-train," in events[5]


def test_an_old_trainjob_without_a_jobset_fails_at_once():
    kubectl = FakeKubectl("trainjob-created", jobset=(None,), events=("events-creation-failed",))
    code, _, waited = _wait_at(TRAINJOB, kubectl, start_age_s=3600)
    assert code == EXIT_FAILED and waited == 0


def test_a_missing_jobset_without_an_event_is_waited_for():
    kubectl = FakeKubectl(
        "trainjob-created", "trainjob-starting", "trainjob-complete", jobset=(None, "jobset-running")
    )
    code, lines, _ = _wait_at(TRAINJOB, kubectl, start_age_s=3600)
    assert code == 0 and "JobSet not created yet" in lines[0]


def test_an_unadmitted_trainjob_says_why_kueue_holds_it():
    kubectl = FakeKubectl(
        "trainjob-suspended-kueue", "trainjob-suspended-kueue", "trainjob-starting", "trainjob-complete"
    )
    code, lines, _ = _wait(TRAINJOB, kubectl)
    assert code == 0
    assert lines[0].endswith(
        "waiting: suspended by Kueue: couldn't assign flavors to pod set node: insufficient unused quota for "
        "aws.amazon.com/neuron in flavor trn1-32xlarge, 32 more needed"
    )
    (workloads,) = {tuple(c) for c in kubectl.calls if c[1] == "workloads.kueue.x-k8s.io"}
    assert "kueue.x-k8s.io/job-uid=5c1f9e2d-7a34-4b8e-9d61-0f2a8c3b7e10" in workloads


def test_a_kueue_older_than_v0_17_is_named():
    code, lines, _ = _wait(TRAINJOB, FakeKubectl("trainjob-suspended-old-kueue"), timeout_s=40)
    assert code == EXIT_TIMEOUT and "upgrade Kueue to v0.17+" in lines[0]


def test_a_jobset_restart_shows_its_count_against_max_restarts():
    kubectl = FakeKubectl(
        "trainjob-running", "trainjob-starting", "trainjob-running", "trainjob-complete",
        jobset=("jobset-running", "jobset-restarting"),
    )  # fmt: skip
    code, lines, _ = _wait(TRAINJOB, kubectl)
    assert code == 0
    assert [line.split(": ", 2)[1:] for line in lines] == [
        ["running", "1 child job(s) with every pod ready"],
        ["running", "restarting: restarted 3 time(s), 1 of maxRestarts 20 counted (evictions are not)"],
        [
            "running",
            "1 child job(s) with every pod ready; restarted 3 time(s), 1 of maxRestarts 20 counted (evictions are not)",
        ],
        ["succeeded", "complete"],
    ]


def test_wait_through_kubectl_fails_fast_on_a_denied_jobset(tmp_path):
    assert cli.main(["jobspec", "--config", str(EXAMPLE), "--out", str(tmp_path / "out")]) == 0
    spec = tmp_path / "out" / "03-train.yaml"
    others = {"jobsets.jobset.x-k8s.io": None, "events": "events-creation-failed"}
    env, _ = _with_fake_kubectl(tmp_path, ["trainjob-created"], others)
    proc = _trnft(env, "wait", str(spec), "--interval", "1s", "--timeout", "12h")
    assert proc.returncode == EXIT_FAILED, proc.stderr
    assert "TrainJobResourcesCreationFailed" in proc.stdout and "'retryable-exit'" in proc.stdout


def test_a_hanging_kubectl_cannot_hold_the_timeout_up(tmp_path):
    """kubectl's own limit is 120 s; `trnft wait --timeout 3s` against an API server that never answers
    ends with 124 in a few seconds, not after kubectl gives up."""
    import time

    assert cli.main(["jobspec", "--config", str(EXAMPLE), "--out", str(tmp_path / "out")]) == 0
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    kubectl = bin_dir / "kubectl"
    kubectl.write_text("#!/bin/sh\nsleep 60\n")
    kubectl.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    started = time.monotonic()
    proc = _trnft(
        env, "wait", str(tmp_path / "out" / "01-tokenize.yaml"), "--interval", "1s", "--timeout", "3s"
    )
    took = time.monotonic() - started
    assert proc.returncode == EXIT_TIMEOUT, proc.stdout + proc.stderr
    assert took < 30, took
    assert "did not answer" in proc.stdout


def test_the_help_lists_every_exit_code_of_wait(capsys):
    with pytest.raises(SystemExit):
        cli.main(["wait", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for code in ("exit 0", "1 as soon as it fails", "124 when --timeout passes", "69 when kubectl"):
        assert code in text, code


@pytest.mark.parametrize("text", ["", "\n---\n", "# only a comment\n"])
def test_an_empty_spec_file_is_one_line_and_never_applied(tmp_path, capsys, text):
    spec = tmp_path / "empty.yaml"
    spec.write_text(text)
    assert cli.main(["submit", str(spec)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no Kubernetes object" in err[0]


def test_wait_through_kubectl_says_why_kueue_holds_a_job_and_counts_restarts(tmp_path):
    assert cli.main(["jobspec", "--config", str(EXAMPLE), "--out", str(tmp_path / "out")]) == 0
    spec = str(tmp_path / "out" / "03-train.yaml")
    queued = tmp_path / "queued"
    queued.mkdir()
    env, _ = _with_fake_kubectl(
        queued, ["trainjob-suspended-kueue"], {"workloads.kueue.x-k8s.io": "workloads-pending"}
    )
    proc = _trnft(env, "wait", spec, "--interval", "1s", "--timeout", "2s")
    assert proc.returncode == EXIT_TIMEOUT, proc.stderr
    assert "waiting: suspended by Kueue: couldn't assign flavors to pod set node" in proc.stdout
    restarting = tmp_path / "restarting"
    restarting.mkdir()
    env, _ = _with_fake_kubectl(
        restarting,
        ["trainjob-starting", "trainjob-complete"],
        {"jobsets.jobset.x-k8s.io": "jobset-restarting"},
    )
    proc = _trnft(env, "wait", spec, "--interval", "1s", "--timeout", "1m")
    assert proc.returncode == 0, proc.stderr
    assert "running: restarting: restarted 3 time(s), 1 of maxRestarts 20 counted" in proc.stdout
