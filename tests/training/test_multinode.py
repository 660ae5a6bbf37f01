"""Multi-node training: two launches of the train stage on 127.0.0.1 meeting through torchrun's c10d
rendezvous form one 2-node x 1-process job, which must train exactly as 1 node x 2 processes."""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from test_training import CONFIG, ENV, assert_same_weights, make_stores, stage, write_params

from mnist_world.model.checkpoint import load_checkpoint
from mnist_world.training.distributed import NODES, RENDEZVOUS, RUN_ID, Cluster
from mnist_world.training.run_folder import lock_file


def free_port() -> int:
    """A port the kernel has just handed out on loopback (the c10d store binds it a moment later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_one_node_needs_no_settings() -> None:
    cluster = Cluster.from_environment({})
    assert not cluster.distributed
    assert cluster.torchrun_options(2) == ["--standalone", "--nproc_per_node=2"]


def test_several_nodes_meet_at_the_rendezvous() -> None:
    cluster = Cluster.from_environment({NODES: "4", RENDEZVOUS: "node001:29500", RUN_ID: "1234"})
    assert cluster.distributed
    assert cluster.torchrun_options(8) == [
        "--nnodes=4", "--nproc_per_node=8", "--rdzv_backend=c10d", "--rdzv_endpoint=node001:29500",
        "--rdzv_id=1234",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("environment", "message"),
    [
        ({NODES: "two"}, "MNIST_WORLD_NODES='two': expected a whole number"),
        ({NODES: "0"}, "MNIST_WORLD_NODES='0': expected a whole number"),
        ({NODES: "2"}, "needs MNIST_WORLD_RENDEZVOUS=host:port"),
        ({NODES: "2", RENDEZVOUS: "node001"}, "MNIST_WORLD_RENDEZVOUS='node001': expected host:port"),
    ],
)
def test_cluster_settings_are_checked(environment: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Cluster.from_environment(environment)


def test_a_stage_without_a_rendezvous_fails_in_one_line(tmp_path: Path) -> None:
    write_params(tmp_path, CONFIG)
    result = subprocess.run(
        stage(tmp_path), cwd=tmp_path, env={**ENV, NODES: "2"}, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "needs MNIST_WORLD_RENDEZVOUS" in result.stderr


def step_seconds(models: Path) -> float:
    """Seconds per training step of the run's epochs (validation included)."""
    payload = load_checkpoint(models / "last.pt")
    return sum(record["seconds"] for record in payload["history"]) / payload["scheduler"]["last_epoch"]


@pytest.mark.slow
def test_two_nodes_of_one_process_train_as_one_node_of_two(tmp_path: Path) -> None:
    """Same ranks, same shares of the data, same gloo all-reduce of two gradients: the same weights, bit for
    bit (a sum of two floats does not depend on their order)."""
    one_node, two_nodes = tmp_path / "one_node", tmp_path / "two_nodes"
    for root in (one_node, two_nodes):
        root.mkdir()
        make_stores(root)
    write_params(one_node, dataclasses.replace(CONFIG, nproc=2))
    started = time.perf_counter()
    reference = subprocess.run(
        stage(one_node), cwd=one_node, env=ENV, capture_output=True, text=True, timeout=300
    )
    one_node_seconds = time.perf_counter() - started
    assert reference.returncode == 0, reference.stdout + reference.stderr

    # Both "nodes" share one folder, as nodes share a file system: rank 0 alone writes models/.
    write_params(two_nodes, dataclasses.replace(CONFIG, nproc=1))
    cluster = {NODES: "2", RENDEZVOUS: f"127.0.0.1:{free_port()}", RUN_ID: uuid.uuid4().hex}
    started = time.perf_counter()
    launches = [
        subprocess.Popen(
            stage(two_nodes),
            cwd=two_nodes,
            env={**ENV, **cluster},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    outputs = [launch.communicate(timeout=300) for launch in launches]
    two_node_seconds = time.perf_counter() - started
    for launch, (stdout, stderr) in zip(launches, outputs, strict=True):
        assert launch.returncode == 0, stdout + stderr
    assert sum("2 epochs, best val_loss" in stdout for stdout, _ in outputs) == 1  # one rank 0, one report

    assert_same_weights(one_node / "models" / "last.pt", two_nodes / "models" / "last.pt")
    history = [load_checkpoint(root / "models" / "last.pt")["history"] for root in (one_node, two_nodes)]
    assert [r["val_loss"] for r in history[0]] == [r["val_loss"] for r in history[1]]
    assert not lock_file(two_nodes / "models").exists()
    print(
        f"\nwall: 1 node x 2 processes {one_node_seconds:.1f} s, 2 nodes x 1 process {two_node_seconds:.1f} s"
        f"; per step: {step_seconds(one_node / 'models'):.3f} s, {step_seconds(two_nodes / 'models'):.3f} s"
    )
