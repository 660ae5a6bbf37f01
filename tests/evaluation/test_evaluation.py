"""Evaluation end to end: a tiny random-weights checkpoint and tiny stores written with the store helpers;
the written values are checked against an independent computation (numpy, scikit-image, the model run by
hand), row by row and horizon by horizon."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
import yaml
from conftest import from_params, params_section, tiny_architecture, write_validation_stores
from PIL import Image
from skimage.metrics import structural_similarity
from typer.testing import CliRunner

from mnist_world.config import DataConfig, EvalConfig, SampleConfig, as_dict
from mnist_world.core.randomness import derived_seed
from mnist_world.core.store import StoreError
from mnist_world.data.sources import generate_sequences
from mnist_world.evaluation.action_following import mirror
from mnist_world.evaluation.evaluate import PREDICTION, evaluate
from mnist_world.model.checkpoint import CheckpointError, save_checkpoint
from mnist_world.model.masking import causal_mask
from mnist_world.model.network import Architecture, build_model
from mnist_world.model.sampling import new_generator, predict_future

ROOT = Path(__file__).resolve().parents[2]
SIZE, FRAMES, LEVELS, PAST = 16, 6, 8, 3
DATA = from_params(
    DataConfig, num_sequences=14, frames=FRAMES, seed=2, train_sequences=4, val_sequences=4, test_sequences=6
)
SAMPLE = from_params(SampleConfig, steps=4)
EVAL = from_params(EvalConfig, sequences=5, batch_size=2, samples=3, strips=3, generations=3)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Stores of 10 generated sequences at 16x16 and a checkpoint of a 1-layer, 16-dim random model."""
    root = tmp_path_factory.mktemp("inputs")
    write_validation_stores(root, generate_sequences(DATA, progress=False), DATA, SIZE, LEVELS)
    torch.manual_seed(0)
    arch = tiny_architecture(LEVELS, SIZE, FRAMES)
    save_checkpoint(root / "best.pt", payload(arch))
    return root


def payload(arch: Architecture) -> dict:
    return {
        "model": build_model(arch).state_dict(),
        "architecture": dataclasses.asdict(arch),
        "params": {
            "train": {"past_frames": PAST, "objectives": {"future": 1.0}},
            "data": {"train_sequences": DATA.train_sequences, "val_sequences": DATA.val_sequences},
        },
    }


def run(inputs: Path, output: Path, checkpoint: Path | None = None, sample=SAMPLE, evaluation=EVAL, **kw):
    return evaluate(
        checkpoint or inputs / "best.pt",
        inputs / "tokens.zarr",
        inputs / "frames.zarr",
        inputs / "actions.zarr",
        sample,
        evaluation,
        output,
        test_sequences=DATA.test_sequences,
        device="cpu",
        progress=False,
        **kw,
    )


@pytest.fixture(scope="module")
def report(inputs, tmp_path_factory):
    output = tmp_path_factory.mktemp("report") / "eval"
    return run(inputs, output), output


def independent_scores(inputs: Path) -> dict[str, dict[str, np.ndarray]]:
    """{method: {metric: (sequences, future frames)}} computed here from the stores and the model alone."""
    from mnist_world.core.store import open_array
    from mnist_world.model.checkpoint import load_model

    model, _ = load_model(inputs / "best.pt")
    first, count = DATA.train_sequences + DATA.val_sequences, EVAL.sequences  # the test split
    tokens = open_array(inputs / "tokens.zarr", "tokens")[first : first + count].astype(np.int64)
    frames = open_array(inputs / "frames.zarr", "frames")[first : first + count].astype(np.float64)
    actions = open_array(inputs / "actions.zarr", "actions")[first : first + count]
    validation = open_array(inputs / "frames.zarr", "frames")[DATA.train_sequences : first].astype(np.float64)
    means = np.array(
        json.loads((inputs / "tokens.zarr" / "zarr.json").read_text())["attributes"]["bin_means"]
    )
    target = frames[:, PAST:]

    # The point prediction: every future token hidden, one causal pass, the mean of each distribution.
    hidden = torch.from_numpy(tokens.copy())
    hidden[:, PAST:] = LEVELS
    with torch.no_grad():
        logits, _ = model(hidden, torch.from_numpy(actions), causal_mask(FRAMES))
    point = (torch.softmax(logits[:, PAST:].double(), dim=-1).numpy() * means).sum(axis=-1)

    # Sampled futures: sample i of the batch starting at sequence s draws from seed (sample.seed, s, 0, i).
    # The mirrored twin of sample 0: the same draws under the mirrored future actions.
    samples = np.zeros((EVAL.samples, *target.shape))
    mirrored = np.zeros(target.shape)
    for start in range(0, count, EVAL.batch_size):
        rows = slice(start, min(start + EVAL.batch_size, count))
        runs = [(index, actions[rows], samples[index]) for index in range(EVAL.samples)]
        for index, command, into in [*runs, (0, mirror(actions[rows], PAST), mirrored)]:
            generator = new_generator(derived_seed(SAMPLE.seed, first + start, PREDICTION, index), "cpu")
            future = predict_future(
                model, torch.from_numpy(tokens[rows, :PAST]), torch.from_numpy(command), SAMPLE,
                mask_id=LEVELS, generator=generator,
            )  # fmt: skip
            into[rows] = means[future.numpy()]

    def scores(prediction: np.ndarray) -> dict[str, np.ndarray]:
        error = (prediction - target) ** 2
        ssim = [
            [
                structural_similarity(prediction[n, f], target[n, f], data_range=1.0, win_size=7)
                for f in range(3)
            ]
            for n in range(count)
        ]
        mse = error.mean(axis=(2, 3))
        overlap = [
            [
                np.logical_and(prediction[n, f] > 0.3, target[n, f] > 0.3).sum()
                / max(np.logical_or(prediction[n, f] > 0.3, target[n, f] > 0.3).sum(), 1)
                if np.logical_or(prediction[n, f] > 0.3, target[n, f] > 0.3).any()
                else 1.0
                for f in range(3)
            ]
            for n in range(count)
        ]
        return {
            "mse": mse,
            "mse_sum": error.sum(axis=(2, 3)),
            "psnr": 10 * np.log10(1 / mse),
            "ssim": np.array(ssim),
            "iou": np.array(overlap),
            "ink": prediction.sum(axis=(2, 3)),
        }

    per_sample = [scores(sample) for sample in samples]
    best = np.argmax([s["iou"].mean(axis=1) for s in per_sample], axis=0)  # (sequences,) best-placed ink
    scale = blur_scale_by_hand(validation)
    return {
        "point": scores(point),
        "sampled": per_sample[0],
        "best_of_n": {
            name: np.stack([s[name] for s in per_sample])[best, np.arange(count)] for name in per_sample[0]
        },
        "mirrored": scores(mirrored),
        "copy_last": scores(np.repeat(frames[:, PAST - 1 : PAST], FRAMES - PAST, axis=1)),
        "blank": scores(np.zeros_like(target)),
        "blurred_last": scores(blur_by_hand(frames[:, PAST - 1], scale)),
        "quantization": scores(means[tokens[:, PAST:]]),
        "_samples_mse": np.stack([s["mse"] for s in per_sample]),
        "_true_ink": target.sum(axis=(2, 3)),
        "_scale": scale,
    }


def blur_by_hand(last: np.ndarray, scale: float) -> np.ndarray:
    """(N, F, H, W): frames (N, H, W) blurred at horizon h by a Gaussian of sigma scale * h, zero outside the
    frame, as a dense matrix product (scipy truncates the kernel at 4 sigma: so does this)."""
    size = last.shape[-1]
    position = np.arange(size)
    blurred = []
    for horizon in range(1, FRAMES - PAST + 1):
        sigma = scale * horizon
        if sigma == 0:
            blurred.append(last)
            continue
        radius = int(4 * sigma + 0.5)
        offset = position[:, None] - position[None, :]
        kernel = np.where(np.abs(offset) <= radius, np.exp(-0.5 * (offset / sigma) ** 2), 0.0)
        kernel /= np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).sum()
        blurred.append(np.einsum("ij,njk,lk->nil", kernel, last, kernel))
    return np.stack(blurred, axis=1)


def blur_scale_by_hand(validation: np.ndarray) -> float:
    """The scale on the 0.05 grid up to 1.5 with the least MSE of the blurred last frame on `validation`."""
    grid = np.round(np.arange(0.0, 1.51, 0.05), 2)
    errors = [((blur_by_hand(validation[:, PAST - 1], s) - validation[:, PAST:]) ** 2).mean() for s in grid]
    return float(grid[int(np.argmin(errors))])


def test_every_written_value_matches_an_independent_computation(inputs, report):
    result, output = report
    expected = independent_scores(inputs)
    samples_mse = expected.pop("_samples_mse")
    true_ink, scale = expected.pop("_true_ink"), expected.pop("_scale")
    for metrics in expected.values():  # ink ratio: a ratio of sums over sequences (and horizons)
        metrics["ink_ratio"] = metrics.pop("ink")
    assert json.loads((output / "metrics.json").read_text()) == result
    assert result["split"] == "test" and result["first_sequence"] == DATA.train_sequences + DATA.val_sequences
    assert result["blurred_last_scale"] == pytest.approx(scale)
    for method, metrics in expected.items():
        for name, values in metrics.items():
            value = values.sum() / true_ink.sum() if name == "ink_ratio" else values.mean()
            assert result[method][name] == pytest.approx(value, rel=1e-4, abs=1e-6), (method, name)
    for method in ("point", "sampled", "best_of_n"):
        blank, copy = expected["blank"]["mse"].mean(), expected["copy_last"]["mse"].mean()
        assert result[method]["mse_vs_blank"] == pytest.approx(result[method]["mse"] / blank)
        assert result[method]["mse_vs_copy_last"] == pytest.approx(result[method]["mse"] / copy)
    with (output / "per_horizon.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["horizon"]) for row in rows] == [1, 2, 3]
    assert len(rows[0]) == 1 + 8 * 6  # horizon, then 8 methods x 6 metrics
    for horizon, row in enumerate(rows):
        for method, metrics in expected.items():
            for name, values in metrics.items():
                column = f"{method}_{name}"
                if name == "ink_ratio":
                    value = values[:, horizon].sum() / true_ink[:, horizon].sum()
                else:
                    value = values[:, horizon].mean()
                assert float(row[column]) == pytest.approx(value, rel=1e-4, abs=1e-6), column
        for method in result["dream"]:  # metrics.json's summary: the same numbers at horizons 1 and 2
            for name in ("ink_ratio", "iou", "ssim"):
                if horizon + 1 in (1, 2):
                    assert result["dream"][method][f"{name}_h{horizon + 1}"] == pytest.approx(
                        float(row[f"{method}_{name}"]), rel=1e-5
                    )
    assert set(result["dream"]) == {
        "point", "sampled", "best_of_n", "mirrored", "blank", "copy_last", "blurred_last"
    }  # fmt: skip
    # Best of N is chosen by the dream score: never a lower mean IoU than any of its samples.
    best_iou = expected["best_of_n"]["iou"].mean(axis=1)
    assert np.all(best_iou >= expected["sampled"]["iou"].mean(axis=1) - 1e-12)
    # MSE chooses nothing: best of N's MSE is one of its samples', not necessarily the least.
    best = expected["best_of_n"]["mse"].mean(axis=1)
    assert np.all(np.isclose(best[None], samples_mse.mean(axis=2)).any(axis=0))


def test_metrics_json_holds_every_method_and_action_following(report):
    result, _ = report
    assert (result["sequences"], result["past_frames"], result["samples"]) == (5, PAST, 3)
    assert result["decode"] == "mean"
    pixels = {"mse", "mse_sum", "psnr", "ssim", "iou", "ink_ratio"}
    for method in ("point", "sampled", "best_of_n"):
        assert set(result[method]) == pixels | {"mse_vs_blank", "mse_vs_copy_last"}
    for method in ("copy_last", "quantization", "blank", "blurred_last", "mirrored"):
        assert set(result[method]) == pixels
    # Decoding to the data's bin means: the floor beats a blank frame on SSIM (0.998 on the default stores;
    # 8 levels at 16x16 here).
    assert result["quantization"]["ssim"] > max(0.95, result["blank"]["ssim"])
    following = result["action_following"]
    assert {
        "error_px", "cosine", "follows", "found", "tracked", "ground_truth_error_px", "ground_truth_found",
        "still_error_px", "blank_error_px", "blank_cosine", "blank_follows", "blank_found",
    } <= set(following)  # fmt: skip
    assert following["blank_found"] == 0.0 and following["blank_cosine"] == 0.0
    assert (
        following["ground_truth_cosine"] > 0.5
    )  # the tracker itself sees the true frames follow the actions
    assert {"cosine", "follows", "tracked"} <= set(result["counterfactual"])


def test_one_sample_is_the_sampled_row_and_no_best_of_n(inputs, report, tmp_path):
    full, _ = report
    single = run(inputs, tmp_path / "one", evaluation=dataclasses.replace(EVAL, samples=1))
    assert "best_of_n" not in single and single["sampled"] == full["sampled"]
    with (tmp_path / "one" / "per_horizon.csv").open() as handle:
        assert not any(column.startswith("best_of_n") for column in next(csv.reader(handle)))


def test_centre_decoding_lowers_the_floor_ssim(inputs, report, tmp_path):
    mean, _ = report
    small = dataclasses.replace(EVAL, samples=1, strips=0, generations=0)
    centre = run(inputs, tmp_path / "centre", evaluation=small, decode="centre")
    assert centre["decode"] == "centre"
    assert centre["quantization"]["mse"] > mean["quantization"]["mse"]
    assert centre["quantization"]["ssim"] < mean["quantization"]["ssim"]


def test_pictures_are_strips_and_animations_of_the_right_size(report):
    _, output = report
    strips = sorted((output / "future_pred").glob("*.png"))
    assert [path.stem for path in strips] == ["sequence_00008", "sequence_00009", "sequence_00010"]
    assert len(list((output / "future_pred").glob("*.gif"))) == 3
    with Image.open(strips[0]) as image:
        width, height = image.size
    # 6 frames, 6 rows (truth, point, sampled, best of N, mirrored, copy last), 4x enlarged.
    assert width > FRAMES * SIZE * 4 and height > 6 * SIZE * 4
    with Image.open(output / "future_pred" / "sequence_00008.gif") as animation:
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
    arch = tiny_architecture(LEVELS * 2, SIZE, FRAMES)
    save_checkpoint(tmp_path / "other.pt", payload(arch))
    with pytest.raises(
        StoreError, match="8 levels of 16x16 tokens, but the checkpoint's model has 16 levels"
    ):
        run(inputs, tmp_path / "out", checkpoint=tmp_path / "other.pt")


def test_more_sequences_than_the_test_split_is_an_error(inputs, tmp_path):
    with pytest.raises(
        ValueError, match=r"eval.sequences=7 exceeds the 6 test sequences \(data.test_sequences\)"
    ):
        run(inputs, tmp_path / "out", evaluation=from_params(EvalConfig, sequences=7))


def test_split_val_scores_the_first_validation_sequences(inputs, tmp_path):
    """What tuning reads: the same scores on validation sequences, the test split untouched."""
    from mnist_world.core.store import open_array

    small = from_params(EvalConfig, sequences=3, batch_size=2, samples=1, strips=0, generations=0)
    result = run(inputs, tmp_path / "val", evaluation=small, split="val")
    assert (result["split"], result["first_sequence"]) == ("val", DATA.train_sequences)
    frames = open_array(inputs / "frames.zarr", "frames")[DATA.train_sequences : DATA.train_sequences + 3]
    blank = (frames[:, PAST:].astype(np.float64) ** 2).mean()  # a blank frame's error is the truth's energy
    assert result["blank"]["mse"] == pytest.approx(blank, rel=1e-6)
    with pytest.raises(ValueError, match=r"eval.sequences=5 exceeds the checkpoint's 4 validation sequences"):
        run(inputs, tmp_path / "more", evaluation=dataclasses.replace(small, sequences=5), split="val")
    with pytest.raises(ValueError, match=r"unknown split 'train' to score"):
        run(inputs, tmp_path / "train", evaluation=small, split="train")


def test_a_test_split_beyond_the_store_is_an_error(inputs, tmp_path):
    """As for a checkpoint trained before the test split existed, on sequences the test split would take."""
    small = from_params(EvalConfig, sequences=1, batch_size=1, samples=1, strips=0, generations=0)
    message = (
        r"best.pt: trained beside sequences 0-7 \(train 4, val 4\), so the 7 test sequences after them need "
        r"15, but the store holds 14: retrain on the current split \(`dvc repro train`\)$"
    )
    with pytest.raises(CheckpointError, match=message):
        evaluate(
            inputs / "best.pt", inputs / "tokens.zarr", inputs / "frames.zarr", inputs / "actions.zarr",
            SAMPLE, small, tmp_path / "out", test_sequences=7, device="cpu", progress=False,
        )  # fmt: skip


def test_guidance_without_the_individual_objective_warns(inputs, tmp_path):
    small = from_params(EvalConfig, sequences=1, batch_size=1, samples=1, strips=0, generations=0)
    with pytest.warns(UserWarning, match="individual"):
        result = run(
            inputs,
            tmp_path / "out",
            sample=from_params(SampleConfig, steps=2, guidance=1.0),
            evaluation=small,
        )
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
        "data": as_dict(DATA),
        "sample": as_dict(SAMPLE),
        "eval": as_dict(
            from_params(EvalConfig, sequences=2, batch_size=2, samples=2, strips=1, generations=1)
        ),
        "tokens": params_section("tokens", frame_size=SIZE, levels=LEVELS, decode="mean"),
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    paths = [f"--{name}={inputs / f'{name}.zarr'}" for name in ("tokens", "frames", "actions")]
    common = ["--params", str(tmp_path / "params.yaml"), *paths, "--device", "cpu", "--no-progress"]
    done = stage(*common, "--checkpoint", str(inputs / "best.pt"), "--output", str(tmp_path / "eval"))
    assert done.returncode == 0, done.stderr
    assert "point MSE" in done.stdout and "best_of_n MSE" in done.stdout
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["sequences"] == 2
    failed = stage(*common, "--checkpoint", str(tmp_path / "missing.pt"), "--output", str(tmp_path / "x"))
    assert failed.returncode == 1
    message = f"error: {tmp_path / 'missing.pt'}: checkpoint not found (run the train stage first)"
    assert failed.stderr.strip().splitlines() == [message]
