"""Learning curves: how fast a configuration learns on this machine, in CPU-minutes.

Each run trains one configuration (params.yaml with `-S section.key=value` overrides) with the library's own
training step in `train.precision` (bf16 where the CPU has it natively, as the train stage; the committed
curves other than long_f16_p2_fast were measured in fp32), on one thread, for a budget of CPU time (one
core's minutes: a measure of work that other processes on a shared machine disturb little, unlike wall time
or the CPU time of spinning threads). Every
`--every` CPU-minutes it scores the point prediction (the model's expected pixel values, see
`sampling.point_prediction`) of the same validation sequences against their decoded true tokens, as a ratio
to the blank frame's error (< 1: better than an empty frame).

    python scripts/learning_curves.py run NAME --minutes 8 -S model.patch_size=4 -S train.lr=1e-3
    python scripts/learning_curves.py plot reports/curves/*.csv --output docs/learning_curves.png

`run` writes reports/curves/NAME.csv (one row per scoring); `plot` draws the CSVs side by side. A run at
another frame size takes `--tokens` (a token store of that size; the action store is resolution-free).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Annotated

import pandas as pd
import torch
import typer
import yaml

from mnist_world import config
from mnist_world.core.devices import autocast_dtype, keep_freed_memory
from mnist_world.core.randomness import derived_seed
from mnist_world.data.dataset import load_split
from mnist_world.data.tokens import Vocabulary
from mnist_world.model.checkpoint import save_checkpoint
from mnist_world.model.masking import choose_objectives
from mnist_world.model.network import Architecture
from mnist_world.training.distributed import Process
from mnist_world.training.epoch import DROPOUT, MASKS, OBJECTIVES, Sequences, epoch_batches
from mnist_world.training.fit import run_params
from mnist_world.training.learner import Learner, train_step
from mnist_world.training.validation import Validation

app = typer.Typer(add_completion=False, no_args_is_help=True)


def override(params: dict, assignments: list[str]) -> dict:
    """params with `section.key=value` assignments applied (values parsed as YAML, as `dvc exp run -S`)."""
    for assignment in assignments:
        path, _, value = assignment.partition("=")
        *sections, key = path.split(".")
        target = params
        for section in sections:
            target = target[section]
        target[key] = yaml.safe_load(value)
    return params


@app.command()
def run(
    name: str,
    minutes: Annotated[float, typer.Option(help="Budget of CPU time, in minutes.")] = 8.0,
    every: Annotated[float, typer.Option(help="CPU-minutes between scorings.")] = 0.5,
    set_: Annotated[list[str], typer.Option("--set", "-S", help="section.key=value override.")] = [],  # noqa: B006
    params: Path = Path("params.yaml"),
    tokens: Path = Path("data/tokens.zarr"),
    actions: Path = Path("data/actions.zarr"),
    sequences: Annotated[int, typer.Option(help="Validation sequences scored.")] = 64,
    output: Path = Path("reports/curves"),
    checkpoint: Annotated[
        Path | None, typer.Option(help="Also save the trained model here, for `stages/evaluate.py`.")
    ] = None,
    threads: Annotated[int, typer.Option(help="Torch threads (1: CPU time counts work, not waiting).")] = 1,
) -> None:
    """Train NAME's configuration for MINUTES of CPU time; score it every EVERY CPU-minutes."""
    torch.set_num_threads(threads)
    keep_freed_memory()  # as the train stage
    raw = override(config.read_params(params), set_)
    model_config = config.build(config.ModelConfig, "model", raw["model"])
    train_config = config.build(config.TrainConfig, "train", {**raw["train"], "device": "cpu"})
    data = config.build(config.DataConfig, "data", raw["data"])
    vocabulary = Vocabulary.from_store(tokens)
    arch = Architecture.from_config(model_config, vocabulary.levels, vocabulary.frame_size, vocabulary.frames)
    sizes = (data.train_sequences, data.val_sequences)
    train_split = Sequences(*load_split(tokens, actions, "train", *sizes, train_config.max_train_sequences))
    val_split = Sequences(*load_split(tokens, actions, "val", *sizes, sequences))
    point_config = dataclasses.replace(train_config, point_sequences=sequences)
    intensities = torch.tensor(vocabulary.intensities)
    validation = Validation.build(val_split, point_config, arch, intensities)

    # The LR schedule spans the budget: its length in steps comes from the speed of a few throwaway steps.
    process, device = Process(), torch.device("cpu")
    amp = autocast_dtype(train_config.precision, device)  # as the train stage: bf16 where the CPU has it
    total_steps = max(int(minutes / _minutes_per_step(arch, train_config, train_split, amp)), 1)
    learner = Learner.build(arch, train_config, total_steps, device)
    torch.manual_seed(derived_seed(train_config.seed, DROPOUT))
    rows: list[dict[str, float]] = []
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    next_score, epoch, seen = 0.0, 0, 0

    def score() -> None:
        scores = validation.score(learner.model, point_config, process, amp)
        cpu = (time.process_time() - cpu_start) / 60
        rows.append(
            {
                "cpu_minutes": cpu,
                "wall_minutes": (time.perf_counter() - wall_start) / 60,
                "step": learner.step,
                "sequences_seen": seen,
                "point_vs_blank": scores["val_point_vs_blank"],
                "point_mse": scores["val_point_mse"],
                "val_loss": scores["val_loss"],
                "frame_size": vocabulary.frame_size,
            }
        )
        typer.echo(
            f"{name}: {cpu:5.2f} CPU-min, step {learner.step}, point/blank {rows[-1]['point_vs_blank']:.3f}"
        )
        table = pd.DataFrame(rows)
        table.insert(0, "run", name)
        output.mkdir(parents=True, exist_ok=True)
        table.to_csv(output / f"{name}.csv", index=False)  # after every scoring: a long run can be watched

    score()
    next_score = every
    while (time.process_time() - cpu_start) / 60 < minutes:
        epoch += 1
        batches = epoch_batches(len(train_split.tokens), train_config, epoch, process, device)
        objectives = choose_objectives(
            train_config,
            len(batches),
            torch.Generator().manual_seed(derived_seed(train_config.seed, OBJECTIVES, epoch)),
        )
        masks = torch.Generator().manual_seed(derived_seed(train_config.seed, MASKS, epoch))
        for indices, objective in zip(batches, objectives, strict=True):
            tokens = train_split.tokens[indices].long()
            train_step(
                learner.model,
                learner,
                tokens,
                train_split.actions[indices],
                objective,
                train_config,
                masks,
                amp,
            )
            seen += len(indices)
            cpu = (time.process_time() - cpu_start) / 60
            if cpu >= next_score:
                score()
                next_score += every
            if cpu >= minutes:
                break
    if rows[-1]["step"] != learner.step:
        score()
    if checkpoint is not None:
        payload = {
            "model": learner.model.state_dict(),
            "architecture": dataclasses.asdict(arch),
            "params": run_params(model_config, train_config, data),
            "vocabulary": dataclasses.asdict(vocabulary),
            "epoch": epoch,
            "step": learner.step,
            "curve": rows,
        }
        save_checkpoint(checkpoint, payload)
    typer.echo(f"{output / f'{name}.csv'}: {len(rows)} scorings, {learner.step} steps, {seen} sequences")


def _minutes_per_step(
    arch: Architecture, train_config: config.TrainConfig, data: Sequences, amp: torch.dtype | None
) -> float:
    learner = Learner.build(arch, train_config, total_steps=10, device=torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    tokens, actions = data.tokens[: train_config.batch_size].long(), data.actions[: train_config.batch_size]
    train_step(learner.model, learner, tokens, actions, "future", train_config, generator, amp)  # warm-up
    started = time.process_time()
    for _ in range(3):
        train_step(learner.model, learner, tokens, actions, "future", train_config, generator, amp)
    return (time.process_time() - started) / 3 / 60


@app.command()
def plot(
    files: list[Path],
    output: Path = Path("docs/learning_curves.png"),
    x: Annotated[str, typer.Option(help="cpu_minutes or wall_minutes.")] = "cpu_minutes",
) -> None:
    """Draw the point prediction's error against the blank frame's for every CSV, on one chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = pd.concat([pd.read_csv(file) for file in files])
    curves = curves[curves["step"] > 0]  # the untrained model's score says nothing about learning
    figure, axis = plt.subplots(figsize=(8, 5), dpi=120)
    colours = plt.get_cmap("tab20").colors
    for index, (name, rows) in enumerate(curves.groupby("run", sort=False)):
        style = "-" if rows["frame_size"].iloc[0] == 16 else "--"  # 16x16 solid, 32x32 dashed
        axis.plot(rows[x], rows["point_vs_blank"], style, marker=".", color=colours[index % 20], label=name)
    axis.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="blank frame")
    axis.set_xlabel("CPU-minutes of training (one core)" if x == "cpu_minutes" else "minutes")
    axis.set_ylabel("point prediction MSE / blank frame MSE")
    axis.set_ylim(0.5, 1.3)  # early scores of the slowest runs lie above: they are in the CSVs
    axis.set_title("Learning curves on 64 validation sequences (lower is better)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output)
    typer.echo(f"{output}: {curves['run'].nunique()} runs")


if __name__ == "__main__":
    app()
