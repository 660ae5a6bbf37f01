"""Evaluation end to end: a tiny random-weights checkpoint and tiny stores written with the store helpers."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
import yaml
from PIL import Image
from typer.testing import CliRunner

from mnist_world.actions import actions_from_centres, ego_centres
from mnist_world.checkpoint import CheckpointError, save_checkpoint
from mnist_world.config import DataConfig, EvalConfig, SampleConfig
from mnist_world.evaluation import evaluate
from mnist_world.model import Architecture, build_model
from mnist_world.sources import generate_sequences
from mnist_world.store import StoreError, create_store, write_sequences
from mnist_world.tokens import downsample, quantize, token_attributes

ROOT = Path(__file__).resolve().parents[1]
SIZE, FRAMES, LEVELS, PAST = 16, 6, 8, 3
DATA = DataConfig(num_sequences=10, frames=FRAMES, seed=2, train_sequences=4, val_sequences=6)
SAMPLE = SampleConfig(steps=4)
EVAL = EvalConfig(sequences=5, batch_size=2, strips=3, generations=3)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Stores of 10 generated sequences at 16x16 and a checkpoint of a 1-layer, 16-dim random model."""
    root = tmp_path_factory.mktemp("inputs")
    generated = generate_sequences(DATA, progress=False)
    frames = downsample(generated.frames, SIZE)  # (N, T, 16, 16) in [0, 1]
    centres = ego_centres(generated.centers, generated.ink) * (SIZE / DATA.canvas)
    stores = {
        "frames": (
            frames,
            {"frame_size": SIZE, "canvas": DATA.canvas, "frames": FRAMES, "source": "generate"},
        ),
        "tokens": (quantize(frames, LEVELS), token_attributes(LEVELS, SIZE, FRAMES, "generate")),
        "actions": (actions_from_centres(centres, SIZE), {"frame_size": SIZE}),
    }
    for name, (array, attributes) in stores.items():
        with create_store(root / f"{name}.zarr", attributes) as group:
            write_sequences(group, name, array, sequences_per_shard=4)
    torch.manual_seed(0)
    arch = Architecture(levels=LEVELS, frame_size=SIZE, frames=FRAMES, layers=1, embed_dim=16, heads=2)
    payload = {
        "model": build_model(arch).state_dict(),
        "architecture": dataclasses.asdict(arch),
        "params": {"train": {"past_frames": PAST, "objectives": {"future": 1.0}}},
    }
    save_checkpoint(root / "best.pt", payload)
    return root


def run(inputs: Path, output: Path, checkpoint: Path | None = None, sample=SAMPLE, evaluation=EVAL):
    return evaluate(
        checkpoint or inputs / "best.pt",
        inputs / "tokens.zarr",
        inputs / "frames.zarr",
        inputs / "actions.zarr",
        sample,
        evaluation,
        DATA,
        output,
        device="cpu",
        progress=False,
    )


@pytest.fixture(scope="module")
def report(inputs, tmp_path_factory):
    output = tmp_path_factory.mktemp("report") / "eval"
    return run(inputs, output), output


def test_metrics_json_holds_the_model_the_baselines_and_action_following(report):
    result, output = report
    assert json.loads((output / "metrics.json").read_text()) == result
    assert (result["sequences"], result["past_frames"], result["future_frames"]) == (5, PAST, FRAMES - PAST)
    for method in ("model", "copy_last", "quantization", "blank"):
        assert set(result[method]) == {"mse", "mse_sum", "psnr", "ssim"}
        assert result[method]["mse_sum"] == pytest.approx(result[method]["mse"] * SIZE * SIZE)
    assert result["quantization"]["mse"] <= (0.5 / LEVELS) ** 2  # at most half a bin off everywhere
    assert result["quantization"]["mse"] < min(result["copy_last"]["mse"], result["blank"]["mse"])
    assert set(result["model_vs_copy_last"]) == {"mse_ratio", "ssim_gain", "beats"}
    following = result["action_following"]
    assert {"error_px", "cosine", "follows", "tracked", "ground_truth_error_px", "still_error_px"} <= set(
        following
    )
    assert (
        following["ground_truth_cosine"] > 0.5
    )  # the tracker itself sees the true frames follow the actions
    assert {"cosine", "follows", "tracked"} <= set(result["counterfactual"])


def test_per_horizon_csv_has_one_row_per_future_frame(report):
    _, output = report
    with (output / "per_horizon.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["horizon"]) for row in rows] == [1, 2, 3]
    assert list(rows[0])[:5] == ["horizon", "model_mse", "copy_last_mse", "quantization_mse", "blank_mse"]
    assert {"model_ssim", "copy_last_ssim", "model_psnr", "blank_mse_sum"} <= set(rows[0])


def test_pictures_are_strips_and_animations_of_the_right_size(report):
    _, output = report
    strips = sorted((output / "future_pred").glob("*.png"))
    assert [path.stem for path in strips] == ["sequence_00004", "sequence_00005", "sequence_00006"]
    assert len(list((output / "future_pred").glob("*.gif"))) == 3
    with Image.open(strips[0]) as image:
        width, height = image.size
    assert width > FRAMES * SIZE * 4 and height > 4 * SIZE * 4  # 6 frames, 4 rows, 4x enlarged
    with Image.open(output / "future_pred" / "sequence_00004.gif") as animation:
        assert animation.n_frames == FRAMES
    assert len(list((output / "generation").glob("*.png"))) == 3
    assert len(list((output / "generation").glob("*.gif"))) == 3


def test_same_checkpoint_and_params_give_identical_reports(inputs, report, tmp_path):
    _, first = report
    run(inputs, tmp_path / "again")
    for name in ("metrics.json", "per_horizon.csv"):
        assert (tmp_path / "again" / name).read_bytes() == (first / name).read_bytes()


def test_a_missing_or_foreign_checkpoint_is_a_clear_error(inputs, tmp_path):
    with pytest.raises(CheckpointError, match="nowhere.pt: checkpoint not found"):
        run(inputs, tmp_path / "out", checkpoint=tmp_path / "nowhere.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="foreign.pt: not a checkpoint of this project"):
        run(inputs, tmp_path / "out", checkpoint=tmp_path / "foreign.pt")
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_a_checkpoint_for_other_tokens_is_rejected(inputs, tmp_path):
    arch = Architecture(levels=LEVELS * 2, frame_size=SIZE, frames=FRAMES, layers=1, embed_dim=16, heads=2)
    payload = {
        "model": build_model(arch).state_dict(),
        "architecture": dataclasses.asdict(arch),
        "params": {"train": {"past_frames": PAST}},
    }
    save_checkpoint(tmp_path / "other.pt", payload)
    with pytest.raises(StoreError, match="16 levels"):
        run(inputs, tmp_path / "out", checkpoint=tmp_path / "other.pt")


def test_more_sequences_than_the_validation_split_is_an_error(inputs, tmp_path):
    with pytest.raises(ValueError, match="eval.sequences=7 exceeds the 6 validation sequences"):
        run(inputs, tmp_path / "out", evaluation=EvalConfig(sequences=7))


def test_guidance_without_the_individual_objective_warns(inputs, tmp_path):
    small = EvalConfig(sequences=1, batch_size=1, strips=0, generations=0)
    with pytest.warns(UserWarning, match="individual"):
        result = run(inputs, tmp_path / "out", sample=SampleConfig(steps=2, guidance=1.0), evaluation=small)
    assert result["sequences"] == 1
    assert not list((tmp_path / "out" / "future_pred").iterdir())


def stage(*arguments: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "stages" / "evaluate.py"), *arguments]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_stage_has_help():
    spec = importlib.util.spec_from_file_location("evaluate_stage", ROOT / "stages" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    app = typer.Typer()
    app.command()(module.main)
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0 and "--checkpoint" in result.output


def test_the_stage_runs_end_to_end_and_fails_in_one_line(inputs, tmp_path):
    params = {
        "sample": dataclasses.asdict(SAMPLE),
        "eval": dataclasses.asdict(EvalConfig(sequences=2, batch_size=2, strips=1, generations=1)),
        "data": {"frames": FRAMES, "train_sequences": 4, "val_sequences": 6, "num_sequences": 10},
        "actions": {"threshold": 0.2, "min_area": 4},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    paths = [f"--{name}={inputs / f'{name}.zarr'}" for name in ("tokens", "frames", "actions")]
    common = ["--params", str(tmp_path / "params.yaml"), *paths, "--device", "cpu", "--no-progress"]
    done = stage(*common, "--checkpoint", str(inputs / "best.pt"), "--output", str(tmp_path / "eval"))
    assert done.returncode == 0, done.stderr
    assert "beats copy-last" in done.stdout
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["sequences"] == 2
    failed = stage(*common, "--checkpoint", str(tmp_path / "missing.pt"), "--output", str(tmp_path / "x"))
    assert failed.returncode == 1
    message = f"error: {tmp_path / 'missing.pt'}: checkpoint not found (run the train stage first)"
    assert failed.stderr.strip().splitlines() == [message]
