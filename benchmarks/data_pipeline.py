"""Time the four data stages' library functions on generated data: generate -> raw store, downsample,
quantize, actions (ground truth plus the tracker it is scored against), in a temporary directory.

    python benchmarks/data_pipeline.py [--sequences 10000] [--shard 1000] [--params params.yaml]

The stages' settings are params.yaml's `data`, `tokens` and `actions` sections (now 16x16 tokens and a
9,500-sequence training split; the README's figure was measured at the earlier code defaults, 32x32 tokens
and 2,000), with --sequences and --shard on top.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer

from mnist_world import config
from mnist_world.actions import ego as actions
from mnist_world.data.frames import build_frames_store
from mnist_world.data.sources import build_raw_store
from mnist_world.data.tokens import build_token_store


def _timed_tracker() -> dict[str, float]:
    """Wrap the tracker so its own seconds (labelling and search, not reading the store) are added up."""
    spent = {"seconds": 0.0, "cpu": 0.0}
    original = actions.track_ego

    def timed(*args, **kwargs):
        started, started_cpu = time.perf_counter(), time.process_time()
        try:
            return original(*args, **kwargs)
        finally:
            spent["seconds"] += time.perf_counter() - started
            spent["cpu"] += time.process_time() - started_cpu

    actions.track_ego = timed
    return spent


def main(
    sequences: Annotated[int, typer.Option(help="Sequences to generate.")] = 10000,
    shard: Annotated[int, typer.Option(help="Sequences per shard (data.sequences_per_shard).")] = 1000,
    directory: Annotated[
        Path | None, typer.Option(help="Work here instead of a temporary directory.")
    ] = None,
    params: Annotated[Path, typer.Option(help="Params file: data, tokens and actions are read.")] = Path(
        "params.yaml"
    ),
) -> None:
    """Print the wall time of each data stage, the total, and the tracker's own time."""
    data = dataclasses.replace(
        config.load("data", params), num_sequences=sequences, sequences_per_shard=shard
    )
    token_config, action_config = config.load("tokens", params), config.load("actions", params)
    tracker = _timed_tracker()
    with tempfile.TemporaryDirectory(dir=directory) as work:
        root = Path(work)
        stages = {
            "generate + raw store": lambda: build_raw_store(data, root / "raw.zarr", progress=False),
            "downsample": lambda: build_frames_store(
                root / "raw.zarr", root / "frames.zarr", token_config, shard, progress=False
            ),
            "quantize": lambda: build_token_store(
                root / "frames.zarr",
                root / "tokens.zarr",
                token_config.levels,
                shard,
                train_sequences=min(data.train_sequences, data.num_sequences),
                progress=False,
            ),  # fmt: skip
            "actions": lambda: actions.build_actions_store(
                root / "raw.zarr", root / "actions.zarr", action_config, token_config.frame_size, shard, False
            ),
        }
        # CPU seconds (all threads) beside wall seconds: on a machine shared with other work the wall time
        # stretches, the CPU time much less.
        results, total, total_cpu = {}, 0.0, 0.0
        typer.echo(f"{'stage':<22} {'wall':>8} {'cpu':>8}")
        for name, run in stages.items():
            started, started_cpu = time.perf_counter(), time.process_time()
            results[name] = run()
            elapsed, cpu = time.perf_counter() - started, time.process_time() - started_cpu
            total, total_cpu = total + elapsed, total_cpu + cpu
            typer.echo(f"{name:<22} {elapsed:6.1f} s {cpu:6.1f} s")
        typer.echo(f"{'total':<22} {total:6.1f} s {total_cpu:6.1f} s")
        typer.echo(f"{'tracker (in actions)':<22} {tracker['seconds']:6.1f} s {tracker['cpu']:6.1f} s")
        floor, report = results["quantize"], results["actions"]
        for rule, scores in floor["quantization"].items():  # both decodings; tokens.decode picks one
            chosen = " (tokens.decode)" if rule == token_config.decode else ""
            typer.echo(
                f"quantization floor, {rule} decoding{chosen}: MSE {scores['mse']:.5f}, "
                f"PSNR {scores['psnr']:.2f} dB"
            )
        typer.echo(
            f"tracker vs ground truth at {report['frame_size']}x{report['frame_size']}: "
            f"mean {report['tracking_error_mean_px']:.4f} px, p95 {report['tracking_error_p95_px']:.4f} px, "
            f"{report['within_half_px']:.2%} within 0.5 px, {report['lost_frames']} lost frames, "
            f"{report['never_apart_sequences']} sequences never apart, "
            f"{report['ego_mismatch_sequences']} ego mismatches"
        )


if __name__ == "__main__":
    typer.run(main)
