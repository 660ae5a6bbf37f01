"""The one-command GPU recipe script, run on the CPU at tiny scale: prepare a bundle, train, evaluate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import from_params

from mnist_world.actions.ego import build_actions_store
from mnist_world.config import ActionsConfig, DataConfig, TokensConfig, build
from mnist_world.data.frames import build_frames_store
from mnist_world.data.sources import build_raw_store
from mnist_world.data.tokens import build_token_store
from mnist_world.model.checkpoint import load_model

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "recipe_gpu.py"

pytestmark = pytest.mark.slow


def script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


@pytest.fixture
def stores(tmp_path: Path) -> tuple[Path, Path]:
    """Tiny token, frame and action stores made by the pipeline's own functions, and a params file."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(
        num_sequences=14, train_sequences=8, val_sequences=4, test_sequences=2, sequences_per_shard=4
    )
    params["tokens"].update(frame_size=8)
    params["model"].update(layers=1, embed_dim=16, heads=2)
    params["sample"].update(steps=3)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    recipe = yaml.safe_load((ROOT / "recipe.yaml").read_text())
    recipe["fast"]["data"] = {"train_sequences": 8, "val_sequences": 4}  # the recipe, on the tiny stores
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    data = build(DataConfig, "data", params["data"])
    folder = tmp_path / "data"
    build_raw_store(data, folder / "raw.zarr", progress=False)
    build_frames_store(
        folder / "raw.zarr", folder / "frames.zarr", from_params(TokensConfig, frame_size=8), 4
    )
    build_token_store(folder / "frames.zarr", folder / "tokens.zarr", 16, 4, train_sequences=8)
    build_actions_store(folder / "raw.zarr", folder / "actions.zarr", from_params(ActionsConfig), 8, 4)
    return folder, tmp_path / "params.yaml"


@pytest.fixture
def bundle(tmp_path: Path, stores: tuple[Path, Path]) -> tuple[Path, Path]:
    """The bundle `prepare` writes from the tiny stores (no wheel download: tests stay offline)."""
    data, params = stores
    bundle = tmp_path / "bundle"
    prepared = script("prepare", "--data", str(data), "--bundle", str(bundle), "--params", str(params),
                      "--recipe", str(tmp_path / "recipe.yaml"), "--no-download-wheels")  # fmt: skip
    assert prepared.returncode == 0, prepared.stderr
    return bundle, params


def run_recipe(tmp_path: Path, bundle: tuple[Path, Path], *options: str) -> subprocess.CompletedProcess:
    folder, params = bundle
    return script("run", "--output", str(tmp_path / "out"), "--bundle", str(folder), "--params", str(params),
                  "--recipe", str(tmp_path / "recipe.yaml"), "--eval-sequences", "2", "--work",
                  str(tmp_path / "work"), *options)  # fmt: skip


def test_prepare_then_run_writes_the_results(tmp_path: Path, bundle: tuple[Path, Path]) -> None:
    split = {"train_sequences": 8, "val_sequences": 4, "test_sequences": 2}
    assert json.loads((bundle[0] / "split.json").read_text()) == split
    ran = run_recipe(tmp_path, bundle, "--epochs", "2", "--probe", "8")
    assert ran.returncode == 0, ran.stderr
    output = tmp_path / "out"
    results = json.loads((output / "results.json").read_text())
    assert results["epochs_done"] == 2 and len(results["epoch_seconds"]) == 2
    assert results["train_sequences"] == 8 and results["sequences_per_second"] > 0
    assert set(results["larger_batches"]) == {"8"}
    assert {"point", "sampled", "copy_last", "blank", "quantization"} <= set(results["metrics"])
    assert (
        results["parameters"]["patch_size"] == 1 and results["parameters"]["embed_dim"] == 128
    )  # the recipe
    table = (output / "results.md").read_text()
    for row in ("model: point prediction", "model: one sample", "copy last frame", "quantization floor"):
        assert f"| {row} |" in table, row
    assert "Action following" in table
    assert (output / "per_horizon.csv").is_file() and (output / "strip_0.png").is_file()
    # The trained weights come back, loadable with their provenance.
    model, payload = load_model(output / "best.pt")
    assert payload["params"]["train"]["lr"] == 3e-4 and payload["params"]["data"]["train_sequences"] == 8
    assert "vocabulary" in payload and "data_fingerprint" in payload
    # What comes back from the GPU machine is at most 8 files.
    assert len(list(output.iterdir())) <= 8


def test_a_time_budget_stops_training_cleanly(tmp_path: Path, bundle: tuple[Path, Path]) -> None:
    # A budget already spent: one epoch runs, then training stops and evaluation still reports.
    ran = run_recipe(tmp_path, bundle, "--epochs", "50", "--probe", "", "--budget", "1")
    assert ran.returncode == 0, ran.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["epochs_done"] == 1 and results["epochs_asked"] == 50
    assert "time budget reached" in ran.stdout + ran.stderr
