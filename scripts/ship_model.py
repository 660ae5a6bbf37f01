"""Make a checkpoint fit to ship: its weights and its record (architecture, params, data fingerprint,
vocabulary, epochs, steps, learning curve, provenance) without the optimizer's moments, the scheduler and the
random states, which only resuming needs (they are two thirds of a checkpoint's size). Prints its size and
sha256, which the model card and the test of the shipped model state; `--curve` draws its learning curve
(validation loss and point prediction against the optimizer steps, from the checkpoint's own history).

    python scripts/ship_model.py RUN/models/best.pt pretrained/world-model.pt --curve docs/model_curve.png
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Any

import typer

from mnist_world.model.checkpoint import save_checkpoint, verify_checkpoint

RESUMING_ONLY = ("optimizer", "scheduler", "rng")


def draw_curve(payload: dict[str, Any], path: Path) -> None:
    """Validation loss and point prediction / blank after each epoch, against the optimizer steps (a
    measure of work that a shared machine does not stretch, as it does wall time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = payload["history"]
    steps = [record["step"] for record in history]
    minutes = sum(record["seconds"] for record in history) / 60
    machine = payload["provenance"]["machine"]
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for axis, name, label in (
        (axes[0], "val_loss", "validation loss (masked tokens)"),
        (axes[1], "val_point_vs_blank", "point prediction MSE / blank frame's"),
    ):
        axis.plot(steps, [record[name] for record in history], marker="o")
        axis.set_xlabel(f"optimizer steps (batch {payload['params']['train']['batch_size']})", fontsize=8)
        axis.set_title(label, fontsize=9)
        axis.grid(alpha=0.3)
    figure.suptitle(
        f"{minutes:.0f} wall minutes in all on {machine['cores']} cores ({machine['processor']})", fontsize=8
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(
    checkpoint: Annotated[Path, typer.Argument(help="The run's checkpoint (best.pt).")],
    output: Annotated[Path, typer.Argument(help="Where the shipped checkpoint goes.")],
    curve: Annotated[Path | None, typer.Option(help="PNG of its learning curve.")] = None,
) -> None:
    payload = verify_checkpoint(checkpoint)
    if "provenance" not in payload:
        typer.echo(f"error: {checkpoint}: no provenance (made before checkpoints recorded it)", err=True)
        raise typer.Exit(1)
    dropped = (*RESUMING_ONLY, "format", "digest")  # save_checkpoint writes the format and a new digest
    shipped = {key: value for key, value in payload.items() if key not in dropped}
    save_checkpoint(output, shipped)
    verify_checkpoint(output)
    data = output.read_bytes()
    typer.echo(f"{output}: {len(data) / 2**20:.2f} MiB, sha256 {hashlib.sha256(data).hexdigest()}")
    if curve is not None:
        draw_curve(payload, curve)
        typer.echo(f"{curve}: its learning curve")


if __name__ == "__main__":
    typer.run(main)
