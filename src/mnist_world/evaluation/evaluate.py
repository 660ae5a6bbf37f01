"""Scoring a checkpoint on the test split: the model's point prediction, its sampled futures and the best
of them against the continuous frames and the trivial baselines, whether its dreams keep their ink where the
truth has it (ink ratio, ink IoU), action following and its counterfactual, and pictures.

`evaluate` is the one entry point; it rebuilds the model from the checkpoint alone, reads past frames and
where its training and validation splits end from the checkpoint's params and the tracker's settings from
the action store, and is deterministic: the same checkpoint, stores and configs give the same metrics.

The test split is the `data.test_sequences` sequences right after the checkpoint's training and validation
splits, so no training, checkpoint selection or tuning has seen them; a checkpoint made before the test split
existed is scored the same way, as its params record where its own splits end. The blurred-last baseline's
one free number is fitted on the checkpoint's validation split.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from mnist_world.config import EvalConfig, SampleConfig
from mnist_world.core.atomic import atomic_path, replace_together, write_json
from mnist_world.core.metrics import (
    baselines,
    fit_blur_scale,
    frame_metrics,
    frame_table,
    overall,
    per_horizon,
)
from mnist_world.core.randomness import derived_seed
from mnist_world.core.store import StoreError
from mnist_world.data.dataset import check_values, split_range
from mnist_world.data.tokens import Vocabulary
from mnist_world.evaluation import pictures
from mnist_world.evaluation.action_following import follow_actions, mirror, summarize_following
from mnist_world.evaluation.stores import ValidationStores
from mnist_world.model.checkpoint import CheckpointError, load_model
from mnist_world.model.network import WorldModel
from mnist_world.model.sampling import (
    generate,
    new_generator,
    point_prediction,
    predict_future,
    warn_if_actions_never_hidden,
    warn_if_unguided,
)

MODEL_METHODS = ("point", "sampled", "best_of_n")  # best_of_n only with eval.samples > 1
BASELINES = ("copy_last", "blank", "blurred_last", "quantization")
# `mirrored`: the first sample's twin under mirrored future actions, scored against the true future: a model
# that obeys its actions moves the digit elsewhere, so its IoU falls below `sampled`'s
DREAM_METHODS = ("point", "sampled", "best_of_n", "mirrored", "blank", "copy_last", "blurred_last")
DREAM_HORIZONS = (1, 2, 5, 10)  # the horizons metrics.json reports the dream scores at (those that exist)
SCALE = 4  # picture enlargement: 32x32 frames become 128x128
PREDICTION, GENERATION = 0, 1  # random streams of the sampler


class Stores(ValidationStores):
    """The three validation inputs, checked against each other and against the checkpoint's model."""

    def __init__(
        self, tokens_path: Path, frames_path: Path, actions_path: Path, model: WorldModel, decode: str
    ) -> None:
        super().__init__(tokens_path, frames_path, actions_path, decode)
        arch, vocabulary = model.arch, self.vocabulary
        if (vocabulary.levels, vocabulary.frame_size) != (arch.levels, arch.frame_size):
            size = vocabulary.frame_size
            raise StoreError(
                f"{tokens_path}: {vocabulary.levels} levels of {size}x{size} tokens, but the checkpoint's "
                f"model has {arch.levels} levels of {arch.frame_size}x{arch.frame_size}"
            )
        if self.tokens.shape[1] > arch.frames:
            raise StoreError(f"{tokens_path}: {self.tokens.shape[1]} frames, the model takes {arch.frames}")


@dataclasses.dataclass(frozen=True)
class Run:
    """What the checkpoint says about how to evaluate it: past frames, the sequences scored (test, or
    validation for tuning) and the validation split."""

    past: int
    first: int  # the first sequence scored
    count: int  # sequences scored
    validation: range  # the checkpoint's validation split (fits the blurred-last baseline)
    split: str = "test"  # the split scored

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: Path,
        payload: dict[str, Any],
        total: int,
        frames: int,
        evaluation: EvalConfig,
        test_sequences: int,
        split: str = "test",
    ) -> Run:
        params = payload.get("params", {})
        train, data = params.get("train", {}), params.get("data", {})
        missing = [
            key
            for key, section in (("train.past_frames", train), ("data.train_sequences", data))
            if key.split(".")[1] not in section
        ]
        if missing:
            raise CheckpointError(f"{checkpoint}: the checkpoint's params lack {', '.join(missing)}")
        past = int(train["past_frames"])
        if not 0 < past < frames:
            raise CheckpointError(
                f"{checkpoint}: train.past_frames={past} leaves no future in {frames} frames"
            )
        train, val = int(data["train_sequences"]), int(data.get("val_sequences", 0))
        validation = split_range("val", train, val, total)
        if not validation:
            raise CheckpointError(f"{checkpoint}: no validation split to fit the blurred-last baseline on")
        if split == "val":
            if evaluation.sequences > val:
                raise ValueError(
                    f"eval.sequences={evaluation.sequences} exceeds the checkpoint's {val} validation "
                    "sequences"
                )
            return cls(past, validation.start, evaluation.sequences, validation, split)
        if split != "test":
            raise ValueError(f"unknown split '{split}' to score (test, or val for tuning)")
        if evaluation.sequences > test_sequences:
            raise ValueError(
                f"eval.sequences={evaluation.sequences} exceeds the {test_sequences} test sequences "
                f"(data.test_sequences)"
            )
        if train + val + test_sequences > total:
            # A checkpoint trained before the test split (or on a larger split) has seen what would be tested
            raise CheckpointError(
                f"{checkpoint}: trained beside sequences 0-{train + val - 1} (train {train}, val {val}), "
                f"so the {test_sequences} test sequences after them need {train + val + test_sequences}, but "
                f"the store holds {total}: retrain on the current split (`dvc repro train`)"
            )
        test = split_range("test", train, val, total, test_sequences=test_sequences)
        return cls(past, test.start, evaluation.sequences, validation, split)


def evaluate(
    checkpoint: str | Path,
    tokens_path: str | Path,
    frames_path: str | Path,
    actions_path: str | Path,
    sample: SampleConfig,
    evaluation: EvalConfig,
    output: str | Path,
    test_sequences: int,
    decode: str = "mean",
    device: str | torch.device = "cpu",
    progress: bool = True,
    split: str = "test",
) -> dict[str, Any]:
    """Score `checkpoint` on the first `evaluation.sequences` test sequences and write `output`/:
    metrics.json, per_horizon.csv, future_pred/ and generation/ (PNG strips and GIFs). Returns the metrics.

    The test split is the `test_sequences` (data.test_sequences) after the checkpoint's training and
    validation splits; `split="val"` scores the checkpoint's first validation sequences instead, which is
    what tuning a setting reads (the test split stays unseen). Tokens become pixels by `decode` (`mean`:
    each level's mean intensity over the training split, `centre`: bin centres). The number of past frames
    is the checkpoint's.
    """
    checkpoint, device = Path(checkpoint), torch.device(device)
    model, payload = load_model(checkpoint, device)
    trained = payload.get("params", {}).get("train", {})
    warn_if_unguided(sample.guidance, trained.get("objectives"))
    warn_if_actions_never_hidden(sample.action_guidance, trained.get("action_dropout"))
    stores = Stores(Path(tokens_path), Path(frames_path), Path(actions_path), model, decode)
    run = Run.from_checkpoint(
        checkpoint, payload, *stores.tokens.shape[:2], evaluation, test_sequences, split
    )
    validation = stores.frames[run.validation.start : run.validation.stop]
    blur_scale = fit_blur_scale(validation, run.past)

    tables, following, drawn = [], {}, []
    starts = range(0, run.count, evaluation.batch_size)
    for start in tqdm(starts, desc="evaluate", unit="batch", disable=not progress):
        first = run.first + start
        rows = slice(first, run.first + min(start + evaluation.batch_size, run.count))
        tokens, truth, commanded = stores.tokens[rows], stores.frames[rows], stores.actions[rows]
        check_values(
            tokens, commanded, stores.vocabulary.levels, first, stores.tokens_path, stores.actions_path
        )
        futures = predict(model, tokens[:, : run.past], commanded, sample, evaluation.samples, first, stores)
        answers = score_answers(futures, truth, tokens, run.past, stores.vocabulary, blur_scale)
        tables.append(frame_table({name: scores for name, (_, scores) in answers.items()}, first))
        moves = follow_actions(
            truth, futures.samples[0], futures.mirrored, commanded, run.past, stores.tracker
        )
        for name, values in moves.items():
            following.setdefault(name, []).append(values)
        for index in range(max(0, min(evaluation.strips - start, len(tokens)))):
            drawn.append({name: frames[index] for name, (frames, _) in answers.items()} | {
                "truth": truth[index], "mirrored": futures.mirrored[index]
            })  # fmt: skip

    table = pd.concat(tables, ignore_index=True)  # one row per (method, sequence, horizon)
    result = summarize(table, run, evaluation, decode, blur_scale)
    result.update(summarize_following({name: np.concatenate(values) for name, values in following.items()}))

    output = Path(output)
    # Every output is made beside `output` first; then they replace the previous ones together.
    with replace_together(output) as staging:
        per_horizon(table).to_csv(staging / "per_horizon.csv", index=False, float_format="%.6g")
        _draw_predictions(staging / "future_pred", drawn, run.past, run.first)
        _draw_generations(staging / "generation", model, stores, sample, evaluation, run.first, device)
        write_json(staging / "metrics.json", result)
    return result


# --- Prediction ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Futures:
    """One batch's predicted futures as pixels in [0, 1]: the point prediction (B, F, H, W), the sampled
    futures (S, B, F, H, W) under the true actions, and the first sample's twin under mirrored actions."""

    point: np.ndarray
    samples: np.ndarray
    mirrored: np.ndarray


def predict(
    model: WorldModel,
    past: np.ndarray,
    actions: np.ndarray,
    sample: SampleConfig,
    samples: int,
    first: int,
    stores: Stores,
) -> Futures:
    """The futures of past tokens (B, P, H, W) under actions (B, T, 2) of the batch starting at sequence
    `first`. Sample i draws from its own seed (sample.seed, first, i); the mirrored run shares sample 0's
    draws, so only the actions differ between them."""
    device = next(model.parameters()).device
    past_ids = torch.from_numpy(past.astype(np.int64)).to(device)
    intensities = torch.tensor(stores.vocabulary.intensities, device=device)

    def sampled(command: np.ndarray, index: int) -> np.ndarray:
        generator = new_generator(derived_seed(sample.seed, first, PREDICTION, index), device)
        command_tensor = torch.from_numpy(np.ascontiguousarray(command)).to(device)
        future = predict_future(
            model, past_ids, command_tensor, sample, mask_id=model.arch.mask_id, generator=generator
        )
        return stores.vocabulary.decode(future.cpu().numpy())

    command = torch.from_numpy(np.ascontiguousarray(actions)).to(device)
    point = point_prediction(model, past_ids, command, intensities, model.arch.mask_id).cpu().numpy()
    return Futures(
        point=point,
        samples=np.stack([sampled(actions, index) for index in range(samples)]),
        mirrored=sampled(mirror(actions, past.shape[1]), 0),
    )


# --- Scoring ---------------------------------------------------------------------------------------------


def score_answers(
    futures: Futures,
    truth: np.ndarray,
    tokens: np.ndarray,
    past: int,
    vocabulary: Vocabulary,
    blur_scale: float,
) -> dict[str, tuple[np.ndarray, dict[str, np.ndarray]]]:
    """{method: (future frames (B, F, H, W), per-frame metrics {metric: (B, F)})} for the model's point
    prediction, its first sample, the best of its samples, the first sample's twin under mirrored actions and
    the baselines.

    Best of N picks, per sequence, the sample with the highest ink IoU averaged over the future (the first on
    a tie): the dream whose digits sit where the truth's do. Picking by MSE would pick the faintest sample,
    since a blank frame costs less than a crisp digit one pixel off.
    """
    target = truth[:, past:]
    sampled = [frame_metrics(frames, target) for frames in futures.samples]
    answers = {
        "point": (futures.point, frame_metrics(futures.point, target)),
        "sampled": (futures.samples[0], sampled[0]),
    }
    if len(futures.samples) > 1:
        overlap = np.stack([scores["iou"].mean(axis=1) for scores in sampled])  # (S, B)
        best = overlap.argmax(axis=0)  # (B,)
        rows = np.arange(len(best))
        answers["best_of_n"] = (
            futures.samples[best, rows],
            {name: np.stack([s[name] for s in sampled])[best, rows] for name in sampled[0]},
        )
    answers["mirrored"] = (futures.mirrored, frame_metrics(futures.mirrored, target))
    for name, frames in baselines(truth[:, :past], tokens[:, past:], vocabulary.decode, blur_scale).items():
        answers[name] = (frames, frame_metrics(frames, target))
    return answers


def summarize(
    table: pd.DataFrame, run: Run, evaluation: EvalConfig, decode: str, blur_scale: float
) -> dict[str, Any]:
    """metrics.json's pixel part: the split scored, each method's means, for the model's answers their MSE as
    a ratio to the blank frame's and the copy-last frame's (< 1: better), and `dream`: per method the ink
    ratio, ink IoU and SSIM at a few horizons and over all of them."""
    means = overall(table)
    result: dict[str, Any] = {
        "split": run.split,
        "first_sequence": run.first,
        "sequences": run.count,
        "past_frames": run.past,
        "samples": evaluation.samples,
        "decode": decode,
        "blurred_last_scale": blur_scale,  # sigma = scale x horizon pixels, fitted on the validation split
    }
    for method, scores in means.items():
        if method in MODEL_METHODS:
            scores = {
                **scores,
                "mse_vs_blank": _ratio(scores["mse"], means["blank"]["mse"]),
                "mse_vs_copy_last": _ratio(scores["mse"], means["copy_last"]["mse"]),
            }
        result[method] = scores
    result["dream"] = dream_summary(table, means)
    return result


def dream_summary(table: pd.DataFrame, means: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """{method: {"ink_ratio_h1": ..., "iou_h5": ..., "ssim_h10": ..., "ink_ratio_mean": ...}}: the scores
    that tell whether a future keeps its digits, at DREAM_HORIZONS and over every horizon."""
    horizons = per_horizon(table).set_index("horizon")
    summary: dict[str, dict[str, float]] = {}
    for method in DREAM_METHODS:
        if method not in means:
            continue
        scores = {}
        for name in ("ink_ratio", "iou", "ssim"):
            for horizon in DREAM_HORIZONS:
                if horizon in horizons.index:
                    scores[f"{name}_h{horizon}"] = float(horizons.at[horizon, f"{method}_{name}"])
            scores[f"{name}_mean"] = means[method][name]
        summary[method] = scores
    return summary


def _ratio(value: float, reference: float) -> float:
    return value / reference if reference > 0 else float("inf")


# --- Pictures --------------------------------------------------------------------------------------------


def _draw_predictions(folder: Path, drawn: list[dict[str, np.ndarray]], past: int, first: int) -> None:
    with atomic_path(folder) as temporary:
        temporary.mkdir()
        for index, rows in enumerate(drawn):
            name = f"sequence_{first + index:05d}"

            def whole(future: np.ndarray, rows: dict[str, np.ndarray] = rows) -> np.ndarray:
                return np.concatenate([rows["truth"][:past], future])

            labelled = [
                ("truth", rows["truth"]),
                ("point", whole(rows["point"])),
                ("sampled", whole(rows["sampled"])),
                *([("best of N", whole(rows["best_of_n"]))] if "best_of_n" in rows else []),
                ("sampled, mirrored", whole(rows["mirrored"])),
                ("copy last", whole(rows["copy_last"])),
            ]
            pictures.save_png(pictures.strip(labelled, past, SCALE), temporary / f"{name}.png")
            panels = [labelled[0], labelled[1], labelled[2], ("mirrored actions", whole(rows["mirrored"]))]
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
            generator = new_generator(derived_seed(sample.seed, first + start, GENERATION), device)
            tokens = generate(
                model,
                actions,
                sample,
                frame_size=model.arch.frame_size,
                mask_id=model.arch.mask_id,
                generator=generator,
            )
            frames = stores.vocabulary.decode(tokens.cpu().numpy())  # (B, T, H, W)
            for offset, sequence in enumerate(frames):
                name = f"generation_{start + offset:03d}"
                pictures.save_png(
                    pictures.strip([("generated", sequence)], 0, SCALE), temporary / f"{name}.png"
                )
                pictures.save_gif(
                    pictures.animation([("generated", sequence)], 0, SCALE), temporary / f"{name}.gif"
                )
