"""End-to-end: the real `dvc repro` / `dvc exp run` / `dvc metrics diff` in a temporary git repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY = {
    "data": {
        "num_sequences": 24,
        "train_sequences": 12,
        "val_sequences": 8,
        "test_sequences": 4,
        "sequences_per_shard": 8,
    },
    "tokens": {"frame_size": 16},
    "model": {"layers": 1, "embed_dim": 16, "heads": 2},
    "train": {"epochs": 2, "max_train_sequences": 8, "max_val_sequences": 4, "checkpoint_every": 1},
    "sample": {"steps": 4},
    "eval": {"sequences": 4, "batch_size": 4, "samples": 2, "strips": 2, "generations": 2},
}

pytestmark = pytest.mark.slow


def run(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(repo / "src"),
        "DVC_NO_ANALYTICS": "1",
    }
    result = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A fresh git + DVC repository holding the pipeline with tiny params."""
    repo = tmp_path / "lab"
    repo.mkdir()
    for name in ("stages", "src"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(repo, "git", "init", "-q")
    run(repo, "git", "config", "user.email", "test@example.com")
    run(repo, "git", "config", "user.name", "test")
    run(repo, "dvc", "init", "-q")
    run(repo, "dvc", "config", "core.analytics", "false")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "pipeline")
    return repo


def test_repro_actions_builds_the_data_stores(repo: Path) -> None:
    run(repo, "dvc", "repro", "actions")

    raw = zarr.open_group(repo / "data/raw.zarr", mode="r")
    assert raw["frames"].shape == (24, 20, 64, 64) and raw["frames"].dtype == np.uint8
    frames = zarr.open_group(repo / "data/frames.zarr", mode="r")["frames"]
    assert frames.shape == (24, 20, 16, 16)
    tokens = zarr.open_group(repo / "data/tokens.zarr", mode="r")
    assert tokens["tokens"].shape == (24, 20, 16, 16) and tokens["tokens"].dtype == np.uint8
    assert int(np.asarray(tokens["tokens"][:]).max()) < 16
    assert tokens.attrs["levels"] == 16 and tokens.attrs["mask_id"] == 16 and tokens.attrs["frame_size"] == 16
    actions = zarr.open_group(repo / "data/actions.zarr", mode="r")["actions"]
    assert actions.shape == (24, 20, 2) and actions.dtype == np.float32
    # A sharded store is a handful of files, not one per chunk.
    assert sum(1 for p in (repo / "data/tokens.zarr").rglob("*") if p.is_file()) < 10

    quantize = json.loads((repo / "reports/quantize.json").read_text())
    floor = quantize["quantization"]
    assert 0 < floor["mean"]["mse"] < floor["centre"]["mse"] < 0.01  # bin means decode closer than centres
    report = json.loads((repo / "reports/actions.json").read_text())
    assert report["tracking_error_mean_px"] < 0.5

    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert {"download", "downsample", "quantize", "actions"} <= set(lock["stages"])
    assert "Data and pipelines are up to date" in run(repo, "dvc", "repro", "actions")


def test_exp_run_with_other_frame_size(repo: Path) -> None:
    run(repo, "dvc", "exp", "run", "actions", "-S", "tokens.frame_size=8", "-S", "data.num_sequences=16")
    tokens = zarr.open_group(repo / "data/tokens.zarr", mode="r")
    assert tokens["tokens"].shape == (16, 20, 8, 8)
    assert tokens.attrs["frame_size"] == 8


def test_full_pipeline_experiments_and_diffs(repo: Path) -> None:
    run(repo, "dvc", "repro")
    metrics = json.loads((repo / "reports/eval/metrics.json").read_text())
    assert {"point", "sampled", "best_of_n", "copy_last", "quantization", "blank"} <= set(metrics)
    assert metrics["quantization"]["ssim"] > metrics["blank"]["ssim"]
    train_metrics = json.loads((repo / "reports/train/metrics.json").read_text())
    assert {"loss", "val_loss", "val_point_vs_blank", "step", "epoch"} <= set(train_metrics)
    assert (repo / "models/best.pt").is_file()
    assert any((repo / "reports/eval/future_pred").glob("*.png"))
    assert any((repo / "reports/eval/generation").glob("*.gif"))
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "baseline")

    run(repo, "dvc", "exp", "run", "-n", "deeper", "-S", "model.layers=2")
    shown = run(repo, "dvc", "exp", "show", "--csv")
    assert "deeper" in shown and "point.mse" in shown

    diff = json.loads(run(repo, "dvc", "metrics", "diff", "HEAD", "deeper", "--json"))
    changed = diff["reports/eval/metrics.json"]
    assert {"point.mse", "sampled.ssim"} <= set(changed)

    run(repo, "dvc", "plots", "diff", "HEAD", "deeper", "-o", "comparison")
    page = (repo / "comparison/index.html").read_text()
    assert "per_horizon" in page
