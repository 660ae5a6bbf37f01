"""A sweep through DVC's experiment queue: two experiments queued with grid syntax run side by side
(`dvc queue start -j 2`) in their own temporary workspaces; `scripts/sweep.py` tabulates and draws them."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from test_pipeline import ROOT
from test_sharing import attempt, make_lab, run

from mnist_world.model.checkpoint import load_checkpoint
from mnist_world.training.run_folder import lock_file

SCRIPT = ROOT / "scripts" / "sweep.py"


def wait_for_the_queue(repo: Path, timeout: float = 600) -> str:
    """`dvc queue status` once nothing is queued or running."""
    deadline = time.monotonic() + timeout
    while True:
        status = run(repo, "dvc", "queue", "status")
        if not any(word in status for word in ("Queued", "Running")):
            return status
        assert time.monotonic() < deadline, f"the queue is still busy:\n{status}"
        time.sleep(2)


@pytest.mark.slow
def test_a_queued_sweep_runs_side_by_side_and_is_tabulated(tmp_path: Path) -> None:
    lab = make_lab(tmp_path / "lab")
    run(lab, "dvc", "repro")  # the baseline: the data stages' outputs, which the queued runs share
    run(lab, "git", "add", "-A")
    run(lab, "git", "commit", "-qm", "baseline")

    run(lab, "dvc", "exp", "run", "--queue", "-S", "model.layers=2,3")
    run(lab, "dvc", "queue", "start", "-j", "2")
    status = wait_for_the_queue(lab)
    assert status.count("Success") == 2, status

    shown = run(lab, "dvc", "exp", "show", "--csv")
    table = pd.read_csv(io.StringIO(shown))
    experiments = table[table["Experiment"].notna() & (table["typ"] != "workspace")]
    assert sorted(experiments["model.layers"].astype(int)) == [2, 3]
    assert experiments["point.mse"].notna().all() and experiments["sampled.ssim"].notna().all()

    # Each experiment trained from scratch in its own workspace (the persistent models folder did not carry
    # the baseline's checkpoints over) and let go of the models lock (.models.lock).
    for name, layers in zip(experiments["Experiment"], experiments["model.layers"].astype(int), strict=True):
        run(lab, "dvc", "exp", "apply", name)
        payload = load_checkpoint(lab / "models" / "best.pt")
        assert payload["params"]["model"]["layers"] == layers
        assert [record["epoch"] for record in payload["history"]] == [1, 2]
        assert not lock_file(lab / "models").exists()

    result = attempt(
        lab, sys.executable, str(SCRIPT), "model.layers", "point.mse", "sampled.mse", "--output", "sweep"
    )
    assert result.returncode == 0, result.stderr
    written = pd.read_csv(lab / "sweep" / "sweep.csv", index_col=0)
    assert list(written.columns) == ["model.layers", "point.mse", "sampled.mse"]
    assert list(written["model.layers"]) == [2, 3]
    assert (lab / "sweep" / "sweep.png").stat().st_size > 1000


COLUMNS = "reports/train/metrics.json:loss,reports/eval/metrics.json:loss,point.mse,model.layers"
SHOWN = f"""Experiment,rev,typ,Created,parent,State,Executor,{COLUMNS}
,workspace,workspace,,,,,0.5,0.6,0.30,1
,main,baseline,2026-01-01T00:00:00,,,,0.5,0.6,0.30,1
wide-elm,1a2b3c4,branch_commit,2026-01-01T00:01:00,,Success,,0.4,0.5,0.20,3
tall-oak,5d6e7f8,branch_commit,2026-01-01T00:02:00,,Success,,0.45,0.55,0.25,2
"""


def test_the_sweep_table_names_its_columns_and_refuses_an_ambiguous_one(tmp_path: Path) -> None:
    (tmp_path / "shown.csv").write_text(SHOWN)
    command = [sys.executable, str(SCRIPT), "--csv", str(tmp_path / "shown.csv"), "--output", str(tmp_path)]
    result = subprocess.run([*command, "model.layers", "point.mse"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    written = pd.read_csv(tmp_path / "sweep.csv", index_col=0)
    assert list(written.index) == ["tall-oak", "wide-elm"] and list(written["point.mse"]) == [0.25, 0.20]
    assert (tmp_path / "sweep.png").is_file()

    result = subprocess.run([*command, "model.layers", "loss"], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert "loss: expected one column of `dvc exp show` named so, found reports/train" in result.stderr
