"""The recipe (RECIPE.md: 50 epochs of 2,000 sequences, batch 4, the 0.67M model) on one GPU, in one command.

`prepare` runs here, after `dvc repro actions`: it copies the train and validation sequences of the token,
frame and action stores into a bundle folder and downloads the wheels that zarr needs on the GPU machine
(which has torch, numpy, pandas, scikit-image, typer and einops, but no zarr, dvc or network):

    python scripts/recipe_gpu.py prepare            # -> gpu_bundle/ (about 8 MB) and .whl/ (about 10 MB)

`run` runs there, through the same library code as the `train` and `evaluate` stages:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
    PYTHONPATH=/tmp/site:src python3 scripts/recipe_gpu.py run --output "$OUT"

(with the device tool: carry [".whl", "gpu_bundle"]; both folders are git-ignored and together well under the
64 MiB that travels). It writes to --output: results.json (per-epoch wall time, peak GPU memory, throughput,
the metrics table), results.md (the same as a README table), per_horizon.csv, a few prediction strips and
best.pt, the trained checkpoint (its params, data fingerprint and vocabulary inside; the date and GPU beside
it in results.json). It stops training cleanly at --budget seconds (default: 8 minutes of wall time for the
whole command). Whatever params.yaml's defaults, it trains the recipe of `recipe.yaml` (its split, model,
optimiser and epochs, and the number of sequences scored; `--epochs`, `--batch-size` and `--eval-sequences`
change them); `--full` trains the full recipe (the 14.6M model, objectives 50/40/10).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from mnist_world import config
from mnist_world.core.atomic import write_json
from mnist_world.core.devices import resolve_device
from mnist_world.core.store import create_store, open_array, open_store, write_sequences
from mnist_world.evaluation.evaluate import evaluate
from mnist_world.model.checkpoint import load_checkpoint
from mnist_world.training import recipe
from mnist_world.training.fit import fit

STORES = {"tokens.zarr": "tokens", "frames.zarr": "frames", "actions.zarr": "actions"}
# What zarr 3 needs beyond the GPU machine's own packages, for its Python (3.12, x86-64).
WHEELS = [
    "zarr", "numcodecs", "donfig", "google-crc32c",
    "pydantic", "pydantic-core", "annotated-types", "typing-inspection",  # the params configs
]  # fmt: skip
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False)


def installed_version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


@app.command()
def prepare(
    data: Annotated[Path, typer.Option(help="Folder holding tokens.zarr, frames.zarr, actions.zarr.")] = Path(
        "data"
    ),
    bundle: Annotated[Path, typer.Option(help="Bundle folder to write.")] = Path("gpu_bundle"),
    wheels: Annotated[Path, typer.Option(help="Wheel folder to fill for the GPU machine.")] = Path(".whl"),
    params: Annotated[Path, typer.Option(help="Params file (its data section).")] = Path("params.yaml"),
    recipe_file: Annotated[
        Path, typer.Option("--recipe", help="Recipe file; its data section gives the split.")
    ] = recipe.RECIPE,
    python_version: Annotated[str, typer.Option(help="The GPU machine's Python.")] = "3.12",
    download_wheels: Annotated[bool, typer.Option(help="Download zarr's wheels into WHEELS.")] = True,
) -> None:
    """Copy the train, validation and test sequences of the stores into BUNDLE and download zarr's wheels."""
    split = recipe.data_config(params, recipe=recipe_file)
    count = split.train_sequences + split.val_sequences + split.test_sequences
    for name, array_name in STORES.items():
        source = data / name
        array = open_array(source, array_name)
        if array.shape[0] < count:
            raise typer.BadParameter(f"{source}: {array.shape[0]} sequences, the split needs {count}")
        with create_store(bundle / name, dict(open_store(source).attrs)) as group:
            write_sequences(group, array_name, array[:count], split.sequences_per_shard)
    write_json(
        bundle / "split.json",
        {
            "train_sequences": split.train_sequences,
            "val_sequences": split.val_sequences,
            "test_sequences": split.test_sequences,
        },
    )
    if download_wheels:
        download(wheels, python_version)
    size = sum(
        p.stat().st_size
        for folder in (bundle, wheels)
        if folder.is_dir()
        for p in folder.rglob("*")
        if p.is_file()
    )
    typer.echo(f"{bundle}/ and {wheels}/ ready: {count} sequences, {size / 2**20:.1f} MiB to carry")


def download(wheels: Path, python_version: str) -> None:
    """The wheels of zarr and what it needs that the GPU machine lacks, at the versions installed here."""
    wheels.mkdir(exist_ok=True)
    pins = [f"{package}=={installed_version(package)}" for package in WHEELS]
    platforms = [argument for platform in PLATFORMS for argument in ("--platform", platform)]
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version", python_version, "--implementation", "cp", *platforms, "-d", str(wheels)]
    subprocess.run([*command, *pins], check=True)


def probe_batch_sizes(
    sizes: str,
    model_config: config.ModelConfig,
    train_config: config.TrainConfig,
    data: config.DataConfig,
    stores: tuple[Path, Path],
    work: Path,
    deadline: float,
) -> dict[str, float]:
    """Sequences per second of one training epoch at each larger batch size, while time remains.

    At batch 4 a 0.67M model on an H200 is bound by kernel launches, not arithmetic; these show the headroom.
    """
    rates: dict[str, float] = {}
    for size in (int(text) for text in sizes.split(",") if text.strip()):
        if time.monotonic() > deadline:
            break
        probe = dataclasses.replace(train_config, epochs=2, batch_size=size)
        folder = work / f"probe_{size}"
        fit(model_config, probe, data, *stores, folder, reports_dir=None, progress=False, fresh=True)
        seconds = load_checkpoint(folder / "last.pt")["history"][-1]["seconds"]
        rates[str(size)] = data.train_sequences / seconds
    return rates


def summary_line(results: dict[str, Any]) -> str:
    """Date, device, epochs, time per epoch (training + validation), throughput, total time, peak memory."""
    memory = "n/a" if results["peak_memory_gib"] is None else f"{results['peak_memory_gib']:.2f} GiB"
    return (
        f"{results['date']}, {results['device']}, torch {results['torch']}: "
        f"{results['epochs_done']}/{results['epochs_asked']} epochs of {results['train_sequences']} "
        f"sequences, "
        f"batch {results['batch_size']}; {results['epoch_seconds_median']:.2f} s per epoch "
        f"({results['sequences_per_second']:.0f} sequences/s), {results['total_seconds']:.0f} s in all, "
        f"peak memory {memory}"
    )


def metrics_table(metrics: dict[str, Any]) -> str:
    """The model's point, sampled and best-of-N futures beside the three baselines, as a Markdown table, and
    the action-following figures."""
    rows = [
        ("model: point prediction", "point"),
        ("model: one sample", "sampled"),
        (f"model: best of {metrics['samples']} samples", "best_of_n"),
        ("copy last frame", "copy_last"),
        ("blank frame", "blank"),
        ("quantization floor", "quantization"),
    ]
    lines = [
        "| | MSE | MSE / blank | MSE (sum per frame) | PSNR (dB) | SSIM |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    blank = metrics["blank"]["mse"]
    for label, key in rows:
        if key in metrics:
            m = metrics[key]
            cells = [f"{m['mse']:.5f}", f"{m['mse'] / blank:.3f}", f"{m['mse_sum']:.2f}", f"{m['psnr']:.2f}"]
            lines.append(f"| {label} | {' | '.join(cells)} | {m['ssim']:.4f} |")

    def figure(values: dict[str, Any], key: str) -> str:
        return "n/a" if values.get(key) is None else f"{values[key]:.2f}"

    following, counterfactual = metrics["action_following"], metrics["counterfactual"]
    lines.append(
        f"\nAction following (one sample): error {figure(following, 'error_px')} px per frame (true frames "
        f"{figure(following, 'ground_truth_error_px')}, a still digit "
        f"{figure(following, 'still_error_px')}), "
        f"cosine {figure(following, 'cosine')}; mirrored actions: cosine to the factual "
        f"{figure(counterfactual, 'cosine_to_factual')}"
    )
    return "\n".join(lines)


@app.command()
def run(
    output: Annotated[Path, typer.Option(help="Folder for results.json, results.md, csv and strips.")],
    bundle: Annotated[Path, typer.Option(help="Bundle folder written by `prepare`.")] = Path("gpu_bundle"),
    params: Annotated[Path, typer.Option(help="Params file (model, train, sample, eval sections).")] = Path(
        "params.yaml"
    ),
    recipe_file: Annotated[Path, typer.Option("--recipe", help="Recipe file (the recipe's numbers).")] = (
        recipe.RECIPE
    ),
    epochs: Annotated[int | None, typer.Option(help="Training epochs (default: the recipe's).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size (default: the recipe's).")] = None,
    compile_model: Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile.")] = False,
    eval_sequences: Annotated[
        int | None, typer.Option(help="Test sequences scored (default: the recipe's).")
    ] = None,
    budget: Annotated[
        float, typer.Option(help="Seconds for the whole command; training stops in time.")
    ] = 480,
    work: Annotated[Path, typer.Option(help="Scratch folder for checkpoints and full reports.")] = Path(
        "/tmp/recipe_gpu"
    ),
    probe: Annotated[
        str, typer.Option(help="Larger batch sizes timed for one epoch each, time allowing.")
    ] = "16,64",
    full: Annotated[bool, typer.Option(help="The full recipe: 14.6M model, objectives 50/40/10.")] = False,
) -> None:
    """Train the recipe on the bundle and evaluate it on the test split; write the figures to OUTPUT."""
    started = time.monotonic()
    split = json.loads((bundle / "split.json").read_text())
    data = dataclasses.replace(config.load("data", params), **split)
    model_config = recipe.model_config(params, full, recipe_file)
    asked = {"epochs": epochs, "batch_size": batch_size}
    train_config = recipe.train_config(
        params,
        full,
        recipe_file,
        device="auto",
        compile=compile_model,
        **{name: value for name, value in asked.items() if value is not None},
    )
    sample = recipe.section("sample", params, recipe_file, full)  # no guidance on actions it never hid
    evaluation = recipe.eval_config(params, full, recipe_file, batch_size=50, strips=3, generations=1)
    if eval_sequences is not None:
        evaluation = dataclasses.replace(evaluation, sequences=eval_sequences)
    decode = config.load("tokens", params).decode
    tokens, frames, actions = (bundle / name for name in STORES)

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    # Keep a minute and a half for evaluation and writing: the 500-sequence evaluation takes under a minute.
    deadline = started + budget - 90
    models = work / "models"
    summary = fit(
        model_config,
        train_config,
        data,
        tokens,
        actions,
        models,
        reports_dir=None,
        fresh=True,
        deadline=deadline,
    )
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    history = load_checkpoint(models / "last.pt")["history"]
    train_seconds = time.monotonic() - started

    metrics = evaluate(
        models / "best.pt",
        tokens,
        frames,
        actions,
        sample,
        evaluation,
        work / "eval",
        test_sequences=data.test_sequences,
        decode=decode,
        device=resolve_device(train_config.device),
    )
    throughput = probe_batch_sizes(
        probe, model_config, train_config, data, (tokens, actions), work, started + budget - 20
    )
    epoch_seconds = [record["seconds"] for record in history]
    steady = epoch_seconds[1:] or epoch_seconds  # the first epoch pays for warm-up (and compilation)
    results = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "epochs_done": summary["epoch"],
        "epochs_asked": train_config.epochs,
        "batch_size": train_config.batch_size,
        "compile": compile_model,
        "recipe": "full" if full else "fast",
        "parameters": load_checkpoint(models / "best.pt")["architecture"],
        "train_sequences": data.train_sequences,
        "epoch_seconds": epoch_seconds,
        "epoch_seconds_median": sorted(steady)[len(steady) // 2],
        "sequences_per_second": data.train_sequences / (sorted(steady)[len(steady) // 2]),
        "train_seconds": train_seconds,
        "total_seconds": time.monotonic() - started,
        "peak_memory_gib": peak_gib,
        "best_val_loss": summary["best_val_loss"],
        "history": history,
        "larger_batches": throughput,
        "metrics": metrics,
    }
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / "results.json", results)
    shutil.copy(work / "eval" / "per_horizon.csv", output / "per_horizon.csv")
    shutil.copy(models / "best.pt", output / "best.pt")  # the trained weights, a few MB
    for index, strip in enumerate(sorted((work / "eval" / "future_pred").glob("*.png"))[:3]):
        shutil.copy(strip, output / f"strip_{index}.png")
    (output / "results.md").write_text(f"{summary_line(results)}\n\n{metrics_table(metrics)}\n")
    typer.echo((output / "results.md").read_text())


if __name__ == "__main__":
    app()
