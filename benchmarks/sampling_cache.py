"""Future-prediction throughput with and without the past-frame cache: the recipe's 0.67M model (random
weights), 32x32 tokens, 20 frames (10 past, 10 future), K iterations, one batch per measurement.

The model's shape and the sampler's settings come from params.yaml's `model` and `sample` sections, with
the recipe's one token per position (patch_size 1), temperature 1.0 and no guidance pinned, as the README's
figures were measured; --steps and each timed mode override the sampler's steps and mode.

    python benchmarks/sampling_cache.py [--batch 4] [--steps 20] [--repeats 3] [--device auto]
                                        [--autoregressive-uncached] [--threads 1] [--params params.yaml]

Uncached, every iteration runs the model on all 20 frames; cached, the 10 past frames are encoded once and
each iteration runs on the 10 future frames only. Both paths must give the same samples (checked).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Annotated

import torch
import typer

from mnist_world import config
from mnist_world.core.devices import resolve_device
from mnist_world.model.network import Architecture, build_model
from mnist_world.model.sampling import new_generator, predict_future

LEVELS, FRAME_SIZE, FRAMES, PAST = 16, 32, 20, 10


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(
    batch: Annotated[int, typer.Option(help="Sequences decoded together.")] = 4,
    steps: Annotated[int, typer.Option(help="Unmasking iterations K.")] = 20,
    device: Annotated[str, typer.Option(help="auto (cuda, then mps, then cpu) or a torch device.")] = "auto",
    autoregressive: Annotated[bool, typer.Option(help="Also time autoregressive mode (cached).")] = True,
    autoregressive_uncached: Annotated[
        bool, typer.Option(help="Also time autoregressive mode without the cache (slow on a CPU).")
    ] = False,
    repeats: Annotated[int, typer.Option(help="Timed runs per variant, interleaved; best counts.")] = 3,
    threads: Annotated[int, typer.Option(help="torch CPU threads (0: torch's default).")] = 0,
    params: Annotated[Path, typer.Option(help="Params file: model and sample are read.")] = Path(
        "params.yaml"
    ),
) -> None:
    """Print seconds per batch, sequences per second and the cache's speed-up for each mode."""
    if threads:
        torch.set_num_threads(threads)
    target = resolve_device(device)
    torch.manual_seed(0)
    # The recipe's one token per position and plain sampling, whatever params.yaml's defaults are now.
    model_config = dataclasses.replace(config.load("model", params), patch_size=1)
    sample_config = dataclasses.replace(config.load("sample", params), temperature=1.0, guidance=0.0)
    arch = Architecture.from_config(model_config, levels=LEVELS, frame_size=FRAME_SIZE, frames=FRAMES)
    model = build_model(arch).to(target).eval()
    generator = torch.Generator(device=target).manual_seed(0)
    shape = (batch, PAST, FRAME_SIZE, FRAME_SIZE)
    tokens = torch.randint(0, LEVELS, shape, generator=generator, device=target)
    actions = 0.1 * torch.randn(batch, FRAMES, 2, generator=generator, device=target)
    typer.echo(
        f"model {model.num_parameters() / 1e6:.2f}M params, {target}, {torch.get_num_threads()} CPU threads, "
        f"batch {batch}, K={steps}, {PAST} past + {FRAMES - PAST} future frames of {FRAME_SIZE}x{FRAME_SIZE}"
    )

    def timed(mode: str, cached: bool) -> tuple[float, float, torch.Tensor]:
        """(wall seconds, CPU seconds of this process, samples) of one batch."""
        settings = dataclasses.replace(sample_config, steps=steps, mode=mode)
        _synchronize(target)
        wall, cpu = time.perf_counter(), time.process_time()
        generator = new_generator(0, target)
        future = predict_future(
            model, tokens, actions, settings, mask_id=arch.mask_id, generator=generator, cached=cached
        )
        _synchronize(target)
        return time.perf_counter() - wall, time.process_time() - cpu, future

    # Warm-up: kernels, allocator, lazy initialisation.
    warm_up = dataclasses.replace(sample_config, steps=1, mode="joint")
    predict_future(model, tokens, actions, warm_up, mask_id=arch.mask_id, generator=generator)

    runs = [("joint", True), ("joint", False)]
    if autoregressive:
        runs.append(("autoregressive", True))
    if autoregressive_uncached:
        runs.append(("autoregressive", False))
    # Interleaved repeats, best taken: other work on the machine only ever slows a run down. On a shared
    # CPU the process's own CPU seconds (with --threads 1) are the steadier measure.
    wall: dict[tuple[str, bool], list[float]] = {run: [] for run in runs}
    cpu: dict[tuple[str, bool], list[float]] = {run: [] for run in runs}
    samples: dict[tuple[str, bool], torch.Tensor] = {}
    for _ in range(repeats):
        for run in runs:
            elapsed, spent, samples[run] = timed(*run)
            wall[run].append(elapsed)
            cpu[run].append(spent)
    for (mode, cached), times in wall.items():
        best = min(times)
        typer.echo(
            f"{mode:>14} {'cached' if cached else 'uncached':>8}: {best:8.2f} s/batch wall, "
            f"{min(cpu[(mode, cached)]):8.2f} s CPU (best of {len(times)}), {batch / best:8.3f} sequences/s"
        )
    for mode in ("joint", "autoregressive"):
        if (mode, True) in wall and (mode, False) in wall:
            by_wall = min(wall[(mode, False)]) / min(wall[(mode, True)])
            by_cpu = min(cpu[(mode, False)]) / min(cpu[(mode, True)])
            same = "identical" if torch.equal(samples[(mode, True)], samples[(mode, False)]) else "DIFFERENT"
            typer.echo(f"{mode}: cache speed-up {by_wall:.2f}x wall, {by_cpu:.2f}x CPU; {same} samples")


if __name__ == "__main__":
    typer.run(main)
