"""Scoring a checkpoint on the validation split: future prediction against the continuous frames and the
trivial baselines, action following and its counterfactual, and pictures of predictions and generations.

`evaluate` is the one entry point; it rebuilds the model from the checkpoint alone and is deterministic:
the same checkpoint, stores and configs give the same metrics, exactly.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mnist_world import metrics as pixel
from mnist_world import pictures
from mnist_world.checkpoint import CheckpointError, load_model
from mnist_world.config import ActionsConfig, DataConfig, EvalConfig, SampleConfig
from mnist_world.dataset import TokenSpec, split_range
from mnist_world.model import WorldModel
from mnist_world.sampling import generate, new_generator, predict_future, warn_if_unguided
from mnist_world.store import StoreError, atomic_path, attribute, open_array, write_json
from mnist_world.tokens import dequantize

METHODS = ("model", "copy_last", "quantization", "blank")
CSV_METRICS = ("mse", "ssim", "psnr", "mse_sum")
SCALE = 4  # picture enlargement: 32x32 frames become 128x128


def batch_seed(seed: int, first: int, stream: int = 0) -> int:
    """A well-mixed seed per batch, named by the sample seed, the batch's first sequence and a stream
    (0: future prediction, 1: unconditional generation)."""
    return int(np.random.SeedSequence([seed, first, stream]).generate_state(1)[0])


class Stores:
    """The three validation inputs, checked against each other and against the model."""

    def __init__(self, tokens_path: Path, frames_path: Path, actions_path: Path, model: WorldModel) -> None:
        self.tokens = open_array(tokens_path, "tokens", ndim=4, dtype=np.uint8)
        self.frames = open_array(frames_path, "frames", ndim=4, dtype=np.float32)
        self.actions = open_array(actions_path, "actions", ndim=3, dtype=np.float32)
        arch, spec = model.arch, TokenSpec.from_store(tokens_path)
        stored = (spec.levels, spec.frame_size, self.tokens.shape[2])
        if stored != (arch.levels, arch.frame_size, arch.frame_size):
            raise StoreError(
                f"{tokens_path}: {spec.levels} levels of {spec.frame_size}x{spec.frame_size} tokens, "
                f"but the checkpoint's model has {arch.levels} levels of {arch.frame_size}x{arch.frame_size}"
            )
        if self.tokens.shape[1] > arch.frames:
            raise StoreError(f"{tokens_path}: {self.tokens.shape[1]} frames, the model takes {arch.frames}")
        if self.frames.shape != self.tokens.shape:
            raise StoreError(
                f"{frames_path}: frames {self.frames.shape} do not match tokens {self.tokens.shape}"
            )
        if self.actions.shape != (*self.tokens.shape[:2], 2):
            raise StoreError(
                f"{actions_path}: actions {self.actions.shape} do not match tokens {self.tokens.shape}"
            )
        self.canvas = int(attribute(frames_path, "canvas"))  # the raw resolution the digits were drawn at


def evaluate(
    checkpoint: str | Path,
    tokens_path: str | Path,
    frames_path: str | Path,
    actions_path: str | Path,
    sample: SampleConfig,
    evaluation: EvalConfig,
    data: DataConfig,
    output: str | Path,
    device: str | torch.device = "cpu",
    tracking: ActionsConfig | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score `checkpoint` on the first `evaluation.sequences` validation sequences and write `output`/:
    metrics.json, per_horizon.csv, future_pred/ and generation/ (PNG strips and GIFs). Returns the metrics.

    The validation split is sequences [train_sequences, train_sequences + val_sequences) of the stores; the
    number of past frames is the checkpoint's `train.past_frames`. `tracking` holds the tracker's ink
    threshold and minimum component area (the `actions` params section; its defaults when None).
    """
    tracking = tracking or ActionsConfig()
    device = torch.device(device)
    model, payload = load_model(checkpoint, device)
    train = payload.get("params", {}).get("train", {})
    if "past_frames" not in train:
        raise CheckpointError(f"{checkpoint}: the checkpoint's params lack train.past_frames")
    past = int(train["past_frames"])
    warn_if_unguided(sample.guidance, train.get("objectives"))
    trained_on = payload.get("params", {}).get("data", {})
    split = {"train_sequences": data.train_sequences, "val_sequences": data.val_sequences}
    if trained_on and any(trained_on.get(key, value) != value for key, value in split.items()):
        # Not an error (a deliberate cross-check is legitimate), but validation may overlap training.
        message = f"{checkpoint}: trained with data split {trained_on}, evaluated with {split}"
        warnings.warn(message, stacklevel=2)
    stores = Stores(Path(tokens_path), Path(frames_path), Path(actions_path), model)
    total, frames = stores.tokens.shape[:2]
    if not 0 < past < frames:
        raise CheckpointError(f"{checkpoint}: train.past_frames={past} leaves no future in {frames} frames")
    validation = split_range("val", data.train_sequences, data.val_sequences, total)
    if evaluation.sequences > len(validation):
        raise ValueError(
            f"eval.sequences={evaluation.sequences} exceeds the {len(validation)} validation sequences"
        )
    first_sequence = validation.start

    per_frame: dict[str, dict[str, list[np.ndarray]]] = {method: {} for method in METHODS}
    following: dict[str, list[np.ndarray]] = {}
    drawn: list[dict[str, np.ndarray]] = []
    tracker = dict(
        threshold=tracking.threshold, min_area=tracking.min_area, digits=data.digits, canvas=stores.canvas
    )
    starts = range(0, evaluation.sequences, evaluation.batch_size)
    for start in tqdm(starts, desc="evaluate", unit="batch", disable=not progress):
        rows = slice(
            first_sequence + start, first_sequence + min(start + evaluation.batch_size, evaluation.sequences)
        )
        tokens = stores.tokens[rows]  # (B, T, H, W) uint8
        truth = stores.frames[rows]  # (B, T, H, W) float32 in [0, 1]
        commanded = stores.actions[rows]  # (B, T, 2)

        # Factual and counterfactual runs share their random draws, so only the actions differ.
        seed = batch_seed(sample.seed, first_sequence + start)
        predicted = _predict(model, tokens[:, :past], commanded, sample, seed, device)
        counterfactual = _predict(
            model, tokens[:, :past], pixel.mirror(commanded, past), sample, seed, device
        )
        target = truth[:, past:]
        answers = {
            "model": predicted,
            **pixel.baselines(truth[:, :past], tokens[:, past:], model.arch.levels),
        }
        for method, answer in answers.items():
            for name, values in pixel.frame_metrics(answer, target).items():
                per_frame[method].setdefault(name, []).append(values)

        moves = _follow_actions(
            truth, predicted, counterfactual, commanded, past, tracker, model.arch.frame_size
        )
        for name, values in moves.items():
            following.setdefault(name, []).append(values)

        for index in range(max(0, min(evaluation.strips - start, len(tokens)))):
            drawn.append(
                {
                    "truth": truth[index],
                    "model": np.concatenate([truth[index, :past], predicted[index]]),
                    "mirrored": np.concatenate([truth[index, :past], counterfactual[index]]),
                    "copy_last": np.concatenate([truth[index, :past], answers["copy_last"][index]]),
                }
            )

    scores = {
        method: {name: np.concatenate(v) for name, v in values.items()}
        for method, values in per_frame.items()
    }
    overall, horizons = pixel.summarize(scores)
    result: dict[str, Any] = {
        "sequences": evaluation.sequences,
        "past_frames": past,
        "future_frames": frames - past,
        **{method: overall[method] for method in METHODS},
        "model_vs_copy_last": pixel.versus(overall["model"], overall["copy_last"]),
        "model_vs_blank": pixel.versus(overall["model"], overall["blank"]),
        **_action_summary({name: np.concatenate(values) for name, values in following.items()}),
    }

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    _write_horizons(output / "per_horizon.csv", horizons)
    _draw_predictions(output / "future_pred", drawn, past, first_sequence)
    _draw_generations(output / "generation", model, stores, sample, evaluation, first_sequence, device)
    write_json(output / "metrics.json", result)
    return result


def _predict(
    model: WorldModel,
    past: np.ndarray,
    actions: np.ndarray,
    sample: SampleConfig,
    seed: int,
    device: torch.device,
) -> np.ndarray:
    """Decoded future frames (B, F, H, W) in [0, 1] after past tokens (B, P, H, W) under actions (B, T, 2)."""
    future = predict_future(
        model,
        torch.from_numpy(past.astype(np.int64)).to(device),
        torch.from_numpy(np.ascontiguousarray(actions)).to(device),
        sample,
        mask_id=model.arch.mask_id,
        generator=new_generator(seed, device),
    )
    return dequantize(future.cpu().numpy(), model.arch.levels)


def _follow_actions(
    truth: np.ndarray,
    predicted: np.ndarray,
    counterfactual: np.ndarray,
    commanded: np.ndarray,
    past: int,
    tracker: dict[str, Any],
    frame_size: int,
) -> dict[str, np.ndarray]:
    """Per-sequence action following of a batch (see `metrics`): {"<run>.<score>": (B,)} for the runs
    model (true actions), counterfactual (mirrored actions) and ground_truth (the true future frames).

    truth (B, T, H, W) frames; predicted, counterfactual (B, F, H, W); commanded (B, T, 2) actions.
    """
    runs = {
        "model": (predicted, commanded),
        "counterfactual": (counterfactual, pixel.mirror(commanded, past)),
        "ground_truth": (truth[:, past:], commanded),
    }
    scores, moved = {}, {}
    for run, (future, command) in runs.items():
        sequence = np.concatenate([truth[:, :past], future], axis=1)  # the past is given in every run
        displacement, tracked = pixel.ego_displacements(sequence, **tracker)
        moved[run] = displacement[:, past - 1 :]  # (B, F, 2): into each future frame
        following = pixel.action_following(moved[run], command[:, past:], frame_size)
        scores.update({f"{run}.{name}": values for name, values in following.items()})
        scores[f"{run}.tracked"] = tracked
    # Still: a digit that does not move, the action-blind answer.
    still = np.zeros_like(moved["model"])
    scores["still.error_px"] = pixel.action_following(still, commanded[:, past:], frame_size)["error_px"]
    scores["counterfactual.cosine_to_factual"] = pixel.trajectory_cosine(
        moved["counterfactual"], moved["model"]
    )
    return scores


def _action_summary(values: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Means over the sequences the tracker could follow, per run, plus the share it could follow."""

    def run(name: str) -> dict[str, float]:
        tracked = values[f"{name}.tracked"]
        if not tracked.any():
            return {"tracked": 0.0}
        return {
            "error_px": float(values[f"{name}.error_px"][tracked].mean()),
            "cosine": float(values[f"{name}.cosine"][tracked].mean()),
            "follows": float(values[f"{name}.follows"][tracked].mean()),
            "tracked": float(tracked.mean()),
        }

    factual, counterfactual, truth = run("model"), run("counterfactual"), run("ground_truth")
    both = values["model.tracked"] & values["counterfactual.tracked"]
    if both.any():
        counterfactual["cosine_to_factual"] = float(values["counterfactual.cosine_to_factual"][both].mean())
    # The tracker's own floor: the same measurement on the true future frames.
    factual["ground_truth_error_px"] = truth.get("error_px")
    factual["ground_truth_cosine"] = truth.get("cosine")
    factual["still_error_px"] = float(values["still.error_px"].mean())
    return {"action_following": factual, "counterfactual": counterfactual}


def _write_horizons(path: Path, rows: list[dict[str, float]]) -> None:
    columns = ["horizon"] + [f"{method}_{name}" for name in CSV_METRICS for method in METHODS]
    with atomic_path(path) as temporary, temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: row[key] if key == "horizon" else f"{row[key]:.6g}" for key in columns})


def _draw_predictions(folder: Path, drawn: list[dict[str, np.ndarray]], past: int, first: int) -> None:
    with atomic_path(folder) as temporary:
        temporary.mkdir()
        for index, rows in enumerate(drawn):
            name = f"sequence_{first + index:05d}"
            labelled = [
                ("truth", rows["truth"]),
                ("model", rows["model"]),
                ("model, mirrored", rows["mirrored"]),
                ("copy last", rows["copy_last"]),
            ]
            pictures.save_png(pictures.strip(labelled, past, SCALE), temporary / f"{name}.png")
            panels = [
                ("truth", rows["truth"]),
                ("model", rows["model"]),
                ("mirrored actions", rows["mirrored"]),
            ]
            pictures.save_gif(pictures.animation(panels, past, SCALE), temporary / f"{name}.gif")


@torch.no_grad()
def _draw_generations(
    folder: Path,
    model: WorldModel,
    stores: Stores,
    sample: SampleConfig,
    evaluation: EvalConfig,
    first: int,
    device: torch.device,
) -> None:
    """Unconditional samples under the actions of the first validation sequences."""
    with atomic_path(folder) as temporary:
        temporary.mkdir()
        for start in range(0, evaluation.generations, evaluation.batch_size):
            stop = min(start + evaluation.batch_size, evaluation.generations)
            actions = torch.from_numpy(stores.actions[first + start : first + stop]).to(device)
            generator = new_generator(batch_seed(sample.seed, first + start, stream=1), device)
            tokens = generate(
                model,
                actions,
                sample,
                frame_size=model.arch.frame_size,
                mask_id=model.arch.mask_id,
                generator=generator,
            )
            frames = dequantize(tokens.cpu().numpy(), model.arch.levels)  # (B, T, H, W)
            for offset, sequence in enumerate(frames):
                name = f"generation_{start + offset:03d}"
                pictures.save_png(
                    pictures.strip([("generated", sequence)], 0, SCALE), temporary / f"{name}.png"
                )
                pictures.save_gif(
                    pictures.animation([("generated", sequence)], 0, SCALE), temporary / f"{name}.gif"
                )
