"""Sharing a run through a real S3-compatible server on 127.0.0.1 (moto's): `dvc push` / `dvc pull` into a
fresh clone, experiments through a bare git remote and the DVC remote, and pulls that fail."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from test_pipeline import BIN, ROOT, TINY

pytestmark = pytest.mark.slow

BUCKET = "lab-remote"
# Starts moto's S3 (and IAM) server on a port the kernel picks, prints the port, and serves until its stdin
# closes, so a test that dies takes its server with it. Requests are signed with real keys from the first
# action on, except the few that create the user and its key (INITIAL_NO_AUTH_ACTION_COUNT).
SERVER = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()
server.stop()
"""
UNSIGNED_SETUP_ACTIONS = 3  # create the user, allow it everything, create its key


@dataclasses.dataclass(frozen=True)
class Storage:
    """A running S3-compatible server: where it listens and a user's key, as the environment gives them."""

    endpoint: str
    key_id: str
    secret: str

    def environment(self, **changes: str) -> dict[str, str]:
        """What a user exports (never committed): the endpoint and the credentials."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_DEFAULT_REGION": "us-east-1",
            **changes,
        }

    def client(self):  # noqa: ANN201 - boto3's client class is generated at run time
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id=self.key_id,
            aws_secret_access_key=self.secret,
        )  # fmt: skip


@contextlib.contextmanager
def s3_server() -> Iterator[Storage]:
    """A fresh S3-compatible server on loopback with a user allowed everything and a bucket, for a while."""
    import boto3

    environment = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(UNSIGNED_SETUP_ACTIONS)}
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, env=environment, text=True,
    )  # fmt: skip
    assert server.stdin is not None and server.stdout is not None
    try:
        endpoint = f"http://127.0.0.1:{int(server.stdout.readline())}"
        iam = boto3.client(
            "iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
            aws_secret_access_key="setup",
        )  # fmt: skip
        iam.create_user(UserName="lab")
        everything = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
        }
        iam.put_user_policy(UserName="lab", PolicyName="everything", PolicyDocument=json.dumps(everything))
        key = iam.create_access_key(UserName="lab")["AccessKey"]
        storage = Storage(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
        storage.client().create_bucket(Bucket=BUCKET)
        yield storage
    finally:
        server.stdin.close()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def storage() -> Iterator[Storage]:
    with s3_server() as server:
        yield server


def attempt(repo: Path, *args: str, environment: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(repo / "src"),
        "DVC_NO_ANALYTICS": "1",
        "OMP_NUM_THREADS": "1",  # tiny models: on a busy machine a second thread only waits (conftest)
        **(environment or {}),
    }
    return subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=900)


def run(repo: Path, *args: str, environment: dict[str, str] | None = None) -> str:
    result = attempt(repo, *args, environment=environment)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def make_lab(repo: Path) -> Path:
    """A git + DVC repository holding the pipeline with tiny params (as test_pipeline's)."""
    repo.mkdir(parents=True)
    for name in ("stages", "src"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for command in (
        ("git", "init", "-q", "-b", "main"),
        ("git", "config", "user.email", "test@example.com"),
        ("git", "config", "user.name", "test"),
        ("dvc", "init", "-q"),
        ("dvc", "config", "core.analytics", "false"),
        ("git", "add", "-A"),
        ("git", "commit", "-qm", "pipeline"),
    ):
        run(repo, *command)
    return repo


@dataclasses.dataclass(frozen=True)
class Origin:
    """The repository a run was made in, pushed: its git remote (a bare repository) and its metrics."""

    repo: Path
    remote: Path
    metrics: str


@pytest.fixture(scope="module")
def origin(storage: Storage, tmp_path_factory: pytest.TempPathFactory) -> Origin:
    """The tiny pipeline reproduced, committed and pushed: git to a bare repository, data to the bucket."""
    root = tmp_path_factory.mktemp("sharing")
    lab = make_lab(root / "lab")
    run(lab, "dvc", "repro")
    # The README's commands: the remote's URL is committed, its endpoint and credentials are not.
    run(lab, "dvc", "remote", "add", "-d", "storage", f"s3://{BUCKET}/cache")
    run(lab, "git", "add", "-A")
    run(lab, "git", "commit", "-qm", "a tiny run")
    run(root, "git", "init", "-q", "--bare", "-b", "main", "remote.git")
    run(lab, "git", "remote", "add", "origin", str(root / "remote.git"))
    run(lab, "git", "push", "-q", "origin", "main")
    assert "endpoint" not in (lab / ".dvc/config").read_text()
    started = time.perf_counter()
    pushed = run(lab, "dvc", "push", environment=storage.environment())
    print(f"\ndvc push: {pushed.strip().splitlines()[-1]} in {time.perf_counter() - started:.1f} s")
    return Origin(lab, root / "remote.git", (lab / "reports/eval/metrics.json").read_text())


def clone(origin: Origin, path: Path) -> Path:
    run(path.parent, "git", "clone", "-q", str(origin.remote), path.name)
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(base: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(
        base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise AssertionError(f"{path}: {error.code} {error.read().decode()}") from None


def test_a_fresh_clone_pulls_the_run_and_reproduces_nothing(
    origin: Origin, storage: Storage, tmp_path: Path
) -> None:
    lab = clone(origin, tmp_path / "clone")
    started = time.perf_counter()
    run(lab, "dvc", "pull", environment=storage.environment())
    print(f"\ndvc pull: {time.perf_counter() - started:.1f} s")
    assert "Data and pipelines are up to date" in run(lab, "dvc", "status")
    reproduced = run(lab, "dvc", "repro")
    assert "Data and pipelines are up to date" in reproduced and "Running stage" not in reproduced

    # The pulled artifacts serve: the evaluate stage scores the pulled checkpoint as it did where it trained,
    run(lab, "dvc", "repro", "--force", "--single-item", "evaluate")
    assert json.loads((lab / "reports/eval/metrics.json").read_text()) == json.loads(origin.metrics)
    # and the playground loads them and dreams a frame.
    play = subprocess.Popen(
        [str(BIN / "mnist-world"), "play", "--port=0"], cwd=lab, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert play.stdout is not None
        line = play.stdout.readline()
        assert line.startswith("mnist-world playground on http://127.0.0.1:"), line + play.stderr.read()
        base = line.split()[3].rstrip("/")
        start = post(base, "/api/restart", {})  # the first validation sequence
        past = yaml.safe_load((lab / "params.yaml").read_text())["train"]["past_frames"]
        body = {"session": start["session"], "frame": past, "action": [0.0, 0.0], "temperature": 1.0}
        assert post(base, "/api/step", body)
    finally:
        play.terminate()
        play.wait(timeout=30)


def test_an_experiment_travels_through_the_git_and_dvc_remotes(
    origin: Origin, storage: Storage, tmp_path: Path
) -> None:
    run(origin.repo, "dvc", "exp", "run", "-n", "deeper", "-S", "model.layers=2")
    metrics = (origin.repo / "reports/eval/metrics.json").read_text()
    weights = (origin.repo / "models/best.pt").read_bytes()
    run(origin.repo, "dvc", "exp", "push", "origin", "deeper", environment=storage.environment())

    lab = clone(origin, tmp_path / "clone")
    run(lab, "dvc", "exp", "pull", "origin", "deeper", environment=storage.environment())
    assert "deeper" in run(lab, "dvc", "exp", "list", "--name-only")
    run(lab, "dvc", "exp", "apply", "deeper")
    assert (lab / "reports/eval/metrics.json").read_text() == metrics
    assert (lab / "models/best.pt").read_bytes() == weights
    assert yaml.safe_load((lab / "params.yaml").read_text())["model"]["layers"] == 2
    assert "Data and pipelines are up to date" in run(lab, "dvc", "status")


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    return [line for line in result.stderr.splitlines() if line.startswith("ERROR: ")]


def test_pulls_that_fail_say_why_and_write_nothing(origin: Origin, storage: Storage, tmp_path: Path) -> None:
    lab = clone(origin, tmp_path / "clone")
    outputs = [lab / "data/raw.zarr", lab / "data/tokens.zarr", lab / "models"]

    wrong = attempt(
        lab, "dvc", "pull", environment=storage.environment(AWS_SECRET_ACCESS_KEY="not-the-secret")
    )
    assert "Forbidden" in error_lines(wrong)[0]
    assert not any(path.exists() for path in outputs)

    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens there: the server is down
    down = attempt(lab, "dvc", "pull", environment=storage.environment(AWS_ENDPOINT_URL=nobody))
    assert f'Could not connect to the endpoint URL: "{nobody}' in error_lines(down)[0]
    assert not any(path.exists() for path in outputs)

    # A copy of the remote that lost one file of the models folder.
    s3 = storage.client()
    for listed in s3.list_objects_v2(Bucket=BUCKET, Prefix="cache/")["Contents"]:
        source = {"Bucket": BUCKET, "Key": listed["Key"]}
        s3.copy_object(
            Bucket=BUCKET, Key="partial/" + listed["Key"].removeprefix("cache/"), CopySource=source
        )
    lock = yaml.safe_load((lab / "dvc.lock").read_text())
    (models,) = [out for out in lock["stages"]["train"]["outs"] if out["path"] == "models"]
    listing = s3.get_object(Bucket=BUCKET, Key=f"partial/files/md5/{models['md5'][:2]}/{models['md5'][2:]}")
    (best,) = [entry["md5"] for entry in json.loads(listing["Body"].read()) if entry["relpath"] == "best.pt"]
    s3.delete_object(Bucket=BUCKET, Key=f"partial/files/md5/{best[:2]}/{best[2:]}")
    run(lab, "dvc", "remote", "add", "--local", "partial", f"s3://{BUCKET}/partial")

    missing = attempt(lab, "dvc", "pull", "--remote", "partial", environment=storage.environment())
    assert any(best in line and "does not exist" in line for line in error_lines(missing)), missing.stderr
    assert not any(path.exists() for path in outputs)  # no models folder without its best.pt, nor the rest

    run(lab, "dvc", "pull", environment=storage.environment())  # the whole remote: all of it, at once
    assert "Data and pipelines are up to date" in run(lab, "dvc", "status")
