"""Tests of the training loop: the masked loss, optimisation, checkpoints, logs, resume, NaN stop and DDP."""

from __future__ import annotations

import csv
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import from_params

from mnist_world.config import DataConfig, ModelConfig, TrainConfig, as_dict
from mnist_world.core.devices import autocast_dtype
from mnist_world.core.randomness import rng_state, set_rng_state
from mnist_world.core.store import create_store, write_sequences
from mnist_world.data.dataset import load_split
from mnist_world.data.tokens import bin_centres, token_attributes
from mnist_world.model.checkpoint import CheckpointError, load_checkpoint, load_model
from mnist_world.model.masking import make_batch, masked_cross_entropy
from mnist_world.model.network import Architecture, build_model
from mnist_world.model.sampling import Context
from mnist_world.training.epoch import DivergenceError
from mnist_world.training.fit import run_params, train
from mnist_world.training.learner import Learner, batch_logits, lr_factor, train_step
from mnist_world.training.run_folder import run_differences

ROOT = Path(__file__).resolve().parents[2]
LEVELS, FRAMES, SIZE = 16, 4, 8
# dropout > 0: resume must restore RNG
MODEL = from_params(ModelConfig, layers=1, embed_dim=16, heads=2, dropout=0.1)
ARCH = Architecture.from_config(MODEL, LEVELS, SIZE, FRAMES)
CONFIG = from_params(
    TrainConfig,
    epochs=2,
    batch_size=4,
    past_frames=2,
    device="cpu",
    precision="fp32",
    checkpoint_every=1,
    seed=3,
    log_every=2,
    point_sequences=4,
    # A short run that learns from its first step: no warm-up, no epoch draw, every validation sequence.
    lr=3e-4,
    betas=(0.9, 0.999),
    warmup_steps=0,
    sequences_per_epoch=0,
    max_val_sequences=0,
)  # 24 training sequences: 6 steps per epoch, the loss logged every 2
SPLIT = from_params(DataConfig, train_sequences=24, val_sequences=8)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # as the one_thread fixture, for the stage's processes
pytestmark = pytest.mark.usefixtures("one_thread")


def sequences(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Toy sequences like Moving MNIST's: mostly background, each frame the previous one moved a pixel."""
    generator = torch.Generator().manual_seed(seed)
    ink = torch.randint(1, LEVELS, (count, 1, SIZE, SIZE), generator=generator)
    first = torch.where(torch.rand(ink.shape, generator=generator) < 0.25, ink, 0)
    frames = [torch.roll(first, shifts=t, dims=-1) for t in range(FRAMES)]
    tokens = torch.cat(frames, dim=1).to(torch.uint8)  # (N, T, H, W)
    actions = torch.zeros(count, FRAMES, 2)
    actions[..., 0] = 1 / (SIZE / 2)
    return tokens, actions


def run(tmp_path: Path, config: TrainConfig = CONFIG, **kwargs: object) -> dict:
    train_data, val_data = sequences(24), sequences(8, seed=1)
    kwargs.setdefault("params", run_params(MODEL, config, SPLIT))
    kwargs.setdefault("progress", False)
    return train(config, ARCH, train_data, val_data, tmp_path / "models", tmp_path / "reports", **kwargs)


def tsv_rows(reports: Path, name: str) -> list[dict[str, str]]:
    with (reports / "plots" / "metrics" / f"{name}.tsv").open() as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def tsv_steps(reports: Path, name: str) -> list[int]:
    return [int(row["step"]) for row in tsv_rows(reports, name)]


def assert_same_weights(first: Path, second: Path) -> None:
    one, two = load_checkpoint(first)["model"], load_checkpoint(second)["model"]
    assert one.keys() == two.keys()
    for key in one:
        assert torch.equal(one[key], two[key]), key


# --- The loss and one step --------------------------------------------------------------------------------


def test_masked_loss_ignores_unmasked_positions() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, FRAMES, SIZE, SIZE, LEVELS, generator=generator)
    targets = torch.randint(0, LEVELS, (2, FRAMES, SIZE, SIZE), generator=generator)
    loss_mask = torch.rand(targets.shape, generator=generator) < 0.3
    loss, correct, count = masked_cross_entropy(logits, targets, loss_mask)
    changed = torch.where(loss_mask, targets, (targets + 1) % LEVELS)  # only unscored targets change
    assert torch.equal(masked_cross_entropy(logits, changed, loss_mask)[0], loss)
    assert count == loss_mask.sum()
    expected = torch.nn.functional.cross_entropy(logits[loss_mask], targets[loss_mask])
    torch.testing.assert_close(loss, expected)
    assert correct == (logits.argmax(-1) == targets)[loss_mask].sum()


def test_one_step_lowers_the_loss_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    model = build_model(ARCH).eval()  # no dropout: the same batch gives the same loss before and after
    tokens, actions = sequences(8)
    tokens = tokens.long()
    batch = make_batch("future", tokens, CONFIG, LEVELS, torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def loss() -> torch.Tensor:
        logits, _ = model(batch.inputs, actions, batch.temporal_mask)
        return masked_cross_entropy(logits, tokens, batch.loss_mask)[0]

    before = loss()
    before.backward()
    optimizer.step()
    assert loss().item() < before.item() - 1e-3


def test_the_next_objective_scores_each_frame_as_frame_by_frame_sampling_decodes_it() -> None:
    """Its two passes (the clean frames' keys and values, then the hidden frames against them) give each
    hidden frame the logits the sampler computes for it after the true frames before it; a step learns."""
    torch.manual_seed(0)
    model = build_model(ARCH).eval()
    tokens, actions = sequences(8)
    tokens = tokens.long()
    config = dataclasses.replace(CONFIG, objectives={"next": 1.0}, past_frames=1, noise_eta=0.0)
    batch = make_batch("next", tokens, config, LEVELS, torch.Generator().manual_seed(0))
    logits = batch_logits(model, batch, tokens, actions)  # what train_step scores
    for frame in range(1, FRAMES):
        context = Context.encode(model, tokens[:, :frame], actions[:, : frame + 1])
        own = context.logits(model, batch.inputs[:, frame - 1 : frame])  # (B, 1, H, W, levels)
        torch.testing.assert_close(logits[:, frame - 1 : frame], own, rtol=1e-5, atol=1e-5)
    learner = Learner.build(ARCH, config, total_steps=10, device=torch.device("cpu"))
    learner.model.load_state_dict(model.state_dict())
    learner.model.eval()  # no dropout: the same batch gives the same loss before and after
    masks = [torch.Generator().manual_seed(1) for _ in range(2)]
    before = train_step(learner.model, learner, tokens, actions, "next", config, masks[0], None)
    after = train_step(learner.model, learner, tokens, actions, "next", config, masks[1], None)
    assert after.item() < before.item()
    with pytest.raises(ValueError, match="train.objectives.next: needs train.nproc 1"):
        from_params(TrainConfig, objectives={"next": 1.0}, nproc=2)


def test_hidden_actions_train_the_unknown_action(tmp_path: Path) -> None:
    """With train.action_dropout the unknown action's embedding learns (what action guidance contrasts
    with); without it no gradient reaches it and it stays at zero."""
    hiding, showing = (dataclasses.replace(CONFIG, action_dropout=share) for share in (0.5, 0.0))
    run(tmp_path / "hiding", hiding, params=run_params(MODEL, hiding, SPLIT))
    run(tmp_path / "showing", showing, params=run_params(MODEL, showing, SPLIT))
    learned = load_checkpoint(tmp_path / "hiding" / "models" / "last.pt")["model"]["unknown_action"]
    untouched = load_checkpoint(tmp_path / "showing" / "models" / "last.pt")["model"]["unknown_action"]
    assert learned.abs().sum() > 0 and not untouched.any()


def test_precision_and_random_state_helpers() -> None:
    assert autocast_dtype("fp32", torch.device("cpu")) is None
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    assert autocast_dtype("auto", torch.device("mps")) is None
    state = rng_state()
    expected = (torch.rand(3), np.random.rand(2))
    set_rng_state(state)
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(2), expected[1])


def test_run_differences_name_the_keys() -> None:
    stored = {"params": {"train": {"lr": 0.1, "epochs": 2}}, "architecture": {"layers": 1}}
    wanted = {"params": {"train": {"lr": 0.2, "epochs": 2}}, "architecture": {"layers": 1}}
    assert run_differences(stored, wanted) == ["params.train.lr: 0.1 -> 0.2"]
    assert run_differences(stored, stored) == []
    assert run_differences({}, {"data_fingerprint": "abc"}) == ["data_fingerprint: '<missing>' -> 'abc'"]


def test_warm_up_betas_and_decay_reach_the_optimizer() -> None:
    config = dataclasses.replace(CONFIG, warmup_steps=4, betas=(0.8, 0.9), lr=1e-3, min_lr=1e-5)
    arch = dataclasses.replace(ARCH, mlp_conv=True)
    learner = Learner.build(arch, config, total_steps=14, device=torch.device("cpu"))
    assert all(group["betas"] == (0.8, 0.9) for group in learner.optimizer.param_groups)
    lrs = []
    for _ in range(14):
        lrs.append(learner.scheduler.get_last_lr()[0])
        learner.optimizer.step()
        learner.scheduler.step()
    # Linear warm-up to the peak in 4 steps, then the cosine down to min_lr at the last step.
    np.testing.assert_allclose(lrs[:4], [2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:], strict=False))
    assert lrs[-1] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + np.cos(np.pi * 9 / 10)))
    assert lr_factor(14, config, 14) * config.lr == pytest.approx(1e-5)  # the floor, once every step is done
    decayed, undecayed = learner.optimizer.param_groups
    assert decayed["weight_decay"] == config.weight_decay and undecayed["weight_decay"] == 0.0
    names = {id(p): name for name, p in learner.model.named_parameters()}
    assert {names[id(p)] for p in undecayed["params"]} == {
        name
        for name, p in learner.model.named_parameters()
        if p.dim() < 2 or name in ("spatial_position", "temporal_position") or name.endswith("bias.table")
    }
    # Weight matrices, the token embedding and the MLPs' depthwise convolution kernels (C, 1, 3, 3).
    kernels = {names[id(p)] for p in decayed["params"] if p.dim() == 4}
    assert kernels == {f"blocks.{i}.mlp.conv.weight" for i in range(arch.layers)}
    assert all(p.dim() in (2, 4) for p in decayed["params"])


# --- The loop, in process ---------------------------------------------------------------------------------


def test_training_writes_checkpoints_and_logs(tmp_path: Path) -> None:
    summary = run(tmp_path, dataclasses.replace(CONFIG, epochs=3, checkpoint_every=2))
    models, reports = tmp_path / "models", tmp_path / "reports"
    assert sorted(path.name for path in models.iterdir()) == ["best.pt", "epoch_002.pt", "last.pt"]
    payload = load_checkpoint(models / "last.pt")  # weights_only: every value is plain
    for key in ("model", "architecture", "params", "optimizer", "scheduler", "rng", "epoch", "best_val_loss"):
        assert key in payload, key
    assert payload["epoch"] == 3 and payload["architecture"] == dataclasses.asdict(ARCH)
    assert payload["params"]["train"]["epochs"] == 3 and payload["params"]["data"]["train_sequences"] == 24
    assert (
        payload["best_val_loss"] == summary["best_val_loss"] == min(r["val_loss"] for r in payload["history"])
    )
    model, best = load_model(models / "best.pt")
    assert model.arch == ARCH and best["metrics"]["val_loss"] == best["best_val_loss"]
    provenance = payload["provenance"]  # where, when and how long: the run's record travels with it
    assert provenance["machine"]["device"] == "cpu" and provenance["machine"]["cores"] == os.cpu_count()
    assert provenance["machine"]["torch"] == torch.__version__ and provenance["date"].endswith("+00:00")
    assert provenance["wall_seconds"] == pytest.approx(sum(r["seconds"] for r in payload["history"]))

    metrics = yaml.safe_load((reports / "metrics.json").read_text())
    per_step, per_epoch = ("loss", "lr"), ("val_loss", "val_accuracy", "val_point_mse", "val_point_vs_blank")
    assert set(metrics) == {*per_step, *per_epoch, "step", "epoch", "best_val_loss"}
    assert metrics["step"] == 18 and metrics["epoch"] == 3
    for name in per_step:  # every train.log_every = 2 steps: a curve even for a short run
        assert tsv_steps(reports, name) == list(range(2, 19, 2))
    for name in per_epoch:  # at the step each epoch ends
        assert tsv_steps(reports, name) == [6, 12, 18]
    assert float(tsv_rows(reports, "lr")[-1]["lr"]) < CONFIG.lr / 10  # the cosine schedule ran to its end
    assert 0 < payload["history"][-1]["val_point_vs_blank"] < 20


def test_training_learns_the_toy_motion(tmp_path: Path) -> None:
    config = dataclasses.replace(CONFIG, epochs=6, lr=3e-3, min_lr=1e-4)
    run(tmp_path, config)
    history = load_checkpoint(tmp_path / "models" / "last.pt")["history"]
    assert history[-1]["val_loss"] < history[0]["val_loss"] - 0.05
    assert history[-1]["loss"] < history[0]["loss"]


def test_a_finished_run_only_rewrites_its_logs(tmp_path: Path) -> None:
    run(tmp_path)
    before = (tmp_path / "models" / "last.pt").stat().st_mtime_ns
    (tmp_path / "reports" / "metrics.json").unlink()  # as `dvc repro` removes non-persistent outputs
    (tmp_path / "models" / ".epoch_003.pt.partial-99").write_bytes(b"left by a killed writer")
    messages: list[str] = []
    summary = run(tmp_path, echo=messages.append)
    assert any("already finished" in message for message in messages)
    assert (tmp_path / "models" / "last.pt").stat().st_mtime_ns == before
    assert summary["epoch"] == 2 and tsv_steps(tmp_path / "reports", "val_loss") == [6, 12]
    assert (tmp_path / "reports" / "metrics.json").exists()
    assert sorted(path.name for path in (tmp_path / "models").iterdir()) == [
        "best.pt", "epoch_001.pt", "epoch_002.pt", "last.pt"
    ]  # fmt: skip


def test_a_run_stopped_after_an_epoch_resumes_to_the_same_weights(tmp_path: Path) -> None:
    """Stopped by its deadline after epoch 1 and resumed: the weights, curves and lr of an uninterrupted run
    (dropout is on, so the RNG state must come back too, as must the optimizer's moments and the schedule)."""
    messages: list[str] = []
    interrupted, whole = tmp_path / "interrupted", tmp_path / "whole"
    summary = run(interrupted, deadline=time.monotonic(), echo=messages.append)  # already passed
    assert summary["epoch"] == 1 and any("time budget reached after epoch 1/2" in m for m in messages)
    assert load_checkpoint(interrupted / "models" / "last.pt")["epoch"] == 1
    assert run(interrupted, echo=messages.append)["epoch"] == 2
    run(whole)
    assert_same_weights(interrupted / "models" / "last.pt", whole / "models" / "last.pt")
    for name in ("loss", "lr", "val_loss"):
        assert tsv_rows(interrupted / "reports", name) == tsv_rows(whole / "reports", name), name


def test_changed_params_start_afresh_and_say_why(tmp_path: Path) -> None:
    run(tmp_path)
    (tmp_path / "models" / ".last.pt.partial-123").write_bytes(b"left by a killed writer")
    messages: list[str] = []
    changed = dataclasses.replace(CONFIG, lr=1e-3, checkpoint_every=5)  # 3e-4 before
    run(tmp_path, changed, echo=messages.append)
    assert any("different run" in m and "params.train.lr: 0.0003 -> 0.001" in m for m in messages), messages
    assert sorted(path.name for path in (tmp_path / "models").iterdir()) == ["best.pt", "last.pt"]
    payload = load_checkpoint(tmp_path / "models" / "last.pt")
    assert payload["params"]["train"]["lr"] == 1e-3 and len(payload["history"]) == 2


def test_changed_data_start_afresh(tmp_path: Path) -> None:
    run(tmp_path)
    messages: list[str] = []
    tokens, actions = sequences(24, seed=5)
    train(
        CONFIG,
        ARCH,
        (tokens, actions),
        sequences(8, seed=1),
        tmp_path / "models",
        None,
        run_params(MODEL, CONFIG, SPLIT),
        progress=False,
        echo=messages.append,
    )
    assert any("data_fingerprint" in message for message in messages)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_damaged_last_checkpoint_fails_naming_the_file(tmp_path: Path, damage: str) -> None:
    run(tmp_path)
    last = tmp_path / "models" / "last.pt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a checkpoint")
    with pytest.raises(CheckpointError, match="last.pt: corrupt") as error:
        run(tmp_path)
    assert "\n" not in str(error.value)


def test_a_non_finite_loss_stops_naming_epoch_and_step(tmp_path: Path) -> None:
    tokens, actions = sequences(24)
    actions[:] = float("inf")  # (NaN would be an unknown action)
    with pytest.raises(DivergenceError, match="epoch 1, step 1"):
        train(CONFIG, ARCH, (tokens, actions), sequences(8), tmp_path / "models", None, {}, progress=False)
    assert not (tmp_path / "models" / "last.pt").exists()


def test_bad_data_and_past_frames_fail_clearly(tmp_path: Path) -> None:
    tokens, actions = sequences(24)
    with pytest.raises(ValueError, match="past_frames"):
        run(tmp_path, dataclasses.replace(CONFIG, past_frames=FRAMES))
    with pytest.raises(ValueError, match="train tokens"):
        train(CONFIG, ARCH, (tokens[:, :, :4], actions), sequences(8), tmp_path / "m", None, progress=False)
    with pytest.raises(ValueError, match="validation split"):
        train(
            CONFIG, ARCH, (tokens, actions), (tokens[:0], actions[:0]), tmp_path / "m", None, progress=False
        )


# --- The stage, in subprocesses ---------------------------------------------------------------------------


def make_stores(root: Path) -> None:
    tokens, actions = (torch.cat(pair) for pair in zip(sequences(48), sequences(8, seed=1), strict=True))
    with create_store(root / "tokens.zarr", token_attributes(LEVELS, SIZE, FRAMES, "generate")) as group:
        write_sequences(group, "tokens", tokens.numpy(), sequences_per_shard=16)
        group.attrs["bin_means"] = bin_centres(LEVELS).tolist()
    with create_store(root / "actions.zarr", {"method": "ground_truth"}) as group:
        write_sequences(group, "actions", actions.numpy(), sequences_per_shard=16)


def write_params(root: Path, config: TrainConfig) -> None:
    params = {
        "model": as_dict(MODEL),
        "train": as_dict(config),
        "data": as_dict(dataclasses.replace(SPLIT, train_sequences=48, val_sequences=8)),
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def stage(root: Path) -> list[str]:
    return [
        sys.executable, str(ROOT / "stages" / "train.py"), "--params", str(root / "params.yaml"),
        "--tokens", str(root / "tokens.zarr"), "--actions", str(root / "actions.zarr"),
        "--output", str(root / "models"), "--reports", str(root / "reports"), "--no-progress",
    ]  # fmt: skip


def test_stage_reports_a_damaged_checkpoint_in_one_line(tmp_path: Path) -> None:
    make_stores(tmp_path)
    write_params(tmp_path, CONFIG)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "last.pt").write_bytes(b"\x00" * 100)
    result = subprocess.run(stage(tmp_path), capture_output=True, text=True, cwd=tmp_path, env=ENV)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "last.pt: corrupt" in result.stderr


@pytest.mark.slow
def test_resume_after_kill_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    config = dataclasses.replace(CONFIG, epochs=5, checkpoint_every=10)
    make_stores(tmp_path)
    write_params(tmp_path, config)
    process = subprocess.Popen(
        stage(tmp_path), cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    last = tmp_path / "models" / "last.pt"
    deadline = time.monotonic() + 120
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert load_checkpoint(last)["epoch"] < config.epochs

    resumed = subprocess.run(stage(tmp_path), cwd=tmp_path, env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch" in resumed.stdout
    # 48 sequences in batches of 4: an epoch is 12 steps; no duplicated rows after the kill
    assert tsv_steps(tmp_path / "reports", "val_loss") == [12, 24, 36, 48, 60]

    reference = tmp_path / "reference"
    data = [
        load_split(tmp_path / "tokens.zarr", tmp_path / "actions.zarr", split, 48, 8)
        for split in ("train", "val")
    ]
    split = from_params(DataConfig, train_sequences=48, val_sequences=8)
    train(config, ARCH, data[0], data[1], reference, None, run_params(MODEL, config, split), progress=False)
    assert_same_weights(last, reference / "last.pt")
    assert (
        load_checkpoint(last)["history"][-1]["val_loss"]
        == load_checkpoint(reference / "last.pt")["history"][-1]["val_loss"]
    )


@pytest.mark.slow
def test_a_failure_under_ddp_ends_in_one_line(tmp_path: Path) -> None:
    """Both ranks diverge: one `error:` line (not one per rank), and none of torchrun's traceback."""
    make_stores(tmp_path)
    write_params(tmp_path, dataclasses.replace(CONFIG, nproc=2, lr=1e30, warmup_steps=0))
    result = subprocess.run(
        stage(tmp_path), cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "non-finite" in errors[0], result.stderr


@pytest.mark.slow
def test_two_process_ddp_trains_and_checkpoints(tmp_path: Path) -> None:
    make_stores(tmp_path)
    write_params(tmp_path, dataclasses.replace(CONFIG, nproc=2))
    result = subprocess.run(
        stage(tmp_path), cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    payload = load_checkpoint(tmp_path / "models" / "last.pt")
    assert payload["epoch"] == 2 and len(payload["rng"]) == 2  # one random state per rank
    assert (tmp_path / "models" / "best.pt").exists()
    assert all(np.isfinite(record["val_loss"]) for record in payload["history"])
    # Each of the 2 ranks takes 24 of the 48 sequences: 6 steps of 4 an epoch, the loss logged every 2.
    assert tsv_steps(tmp_path / "reports", "loss") == [2, 4, 6, 8, 10, 12]
    assert tsv_steps(tmp_path / "reports", "val_loss") == [6, 12]
    # Both ranks trained a share: 48 sequences / 2 ranks / batch 4 = 6 steps per epoch and rank.
    assert payload["scheduler"]["last_epoch"] == 12


def test_each_epoch_draws_a_fresh_share_of_the_split() -> None:
    from mnist_world.training.distributed import Process
    from mnist_world.training.epoch import epoch_batches, steps_per_epoch

    config = dataclasses.replace(CONFIG, sequences_per_epoch=8, batch_size=4)
    first, second = (
        torch.cat(epoch_batches(24, config, epoch, Process(), torch.device("cpu"))) for epoch in (1, 2)
    )
    assert len(first) == len(second) == 8 and len(set(first.tolist())) == 8
    assert set(first.tolist()) != set(second.tolist())  # another draw: data the model saw less
    assert steps_per_epoch(24, config, Process()) == 2
    assert torch.equal(first, torch.cat(epoch_batches(24, config, 1, Process(), torch.device("cpu"))))
