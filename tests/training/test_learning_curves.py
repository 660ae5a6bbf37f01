"""The learning-curve script on tiny stores: a run writes its scorings as it goes, saves a checkpoint that
the evaluation reads, and the chart is drawn from the CSVs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml
from conftest import from_params

from mnist_world.actions.ego import build_actions_store
from mnist_world.config import ActionsConfig, DataConfig, TokensConfig, build
from mnist_world.data.frames import build_frames_store
from mnist_world.data.sources import build_raw_store
from mnist_world.data.tokens import build_token_store
from mnist_world.model.checkpoint import load_model

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "learning_curves.py"


def test_a_run_scores_as_it_trains_and_the_chart_is_drawn(tmp_path: Path) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(num_sequences=12, train_sequences=8, val_sequences=4, sequences_per_shard=4)
    params["tokens"].update(frame_size=8)
    params["model"].update(layers=1, embed_dim=16, heads=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    data = build(DataConfig, "data", params["data"])
    build_raw_store(data, tmp_path / "raw.zarr", progress=False)
    build_frames_store(
        tmp_path / "raw.zarr", tmp_path / "frames.zarr", from_params(TokensConfig, frame_size=8), 4
    )
    build_token_store(tmp_path / "frames.zarr", tmp_path / "tokens.zarr", 16, 4, train_sequences=8)
    build_actions_store(tmp_path / "raw.zarr", tmp_path / "actions.zarr", from_params(ActionsConfig), 8, 4)

    run = [sys.executable, str(SCRIPT), "run", "tiny", "--minutes", "0.02", "--every", "0.005"]
    paths = ["--params", str(tmp_path / "params.yaml"), "--tokens", str(tmp_path / "tokens.zarr")]
    paths += ["--actions", str(tmp_path / "actions.zarr"), "--output", str(tmp_path / "curves")]
    options = ["--sequences", "2", "--checkpoint", str(tmp_path / "tiny.pt"), "-S", "train.batch_size=2"]
    done = subprocess.run([*run, *paths, *options], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    curve = pd.read_csv(tmp_path / "curves" / "tiny.csv")
    assert {"run", "cpu_minutes", "step", "point_vs_blank", "frame_size"} <= set(curve.columns)
    assert len(curve) >= 2 and curve["step"].iloc[0] == 0 and curve["step"].is_monotonic_increasing
    assert (curve["frame_size"] == 8).all() and (curve["point_vs_blank"] > 0).all()
    model, payload = load_model(tmp_path / "tiny.pt")  # evaluation can score what the run trained
    assert model.arch.frame_size == 8 and payload["params"]["train"]["batch_size"] == 2

    chart = tmp_path / "chart.png"
    drawn = subprocess.run(
        [sys.executable, str(SCRIPT), "plot", str(tmp_path / "curves" / "tiny.csv"), "--output", str(chart)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert drawn.returncode == 0, drawn.stderr
    assert chart.stat().st_size > 1000
