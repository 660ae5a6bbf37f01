"""The shipped world model (pretrained/world-model.pt): the file the model card describes, its record, a
model that dreams; and, end to end, the README's commands for it on a fresh clone after the data stages."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import from_params
from test_pipeline import BIN, ROOT, run

from mnist_world.actions.ego import build_actions_store
from mnist_world.config import ActionsConfig, DataConfig, SampleConfig, TokensConfig
from mnist_world.data.dataset import load_split
from mnist_world.data.frames import build_frames_store, downsample
from mnist_world.data.sources import build_raw_store, generate_sequences
from mnist_world.data.tokens import build_token_store, quantize
from mnist_world.model.checkpoint import load_model, verify_checkpoint
from mnist_world.model.sampling import new_generator
from mnist_world.playground.dreamer import Dreamer, SamplerSettings
from mnist_world.playground.world import ValidationData, load_world
from mnist_world.training.epoch import Sequences
from mnist_world.training.fit import data_fingerprint

spec = importlib.util.spec_from_file_location("dream_rollout", ROOT / "scripts" / "dream_rollout.py")
rollout = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rollout)

SHIPPED = ROOT / "pretrained" / "world-model.pt"
MODEL_CARD = ROOT / "docs" / "model-card.md"
SHA256 = "dddb70035b3ac003a899be6036dfb0c63589cbc35b577506b2291f49a1fb3366"
STEPS = 7200


def test_the_shipped_checkpoint_is_the_one_the_model_card_describes() -> None:
    digest = hashlib.sha256(SHIPPED.read_bytes()).hexdigest()
    assert digest == SHA256
    assert SHA256 in MODEL_CARD.read_text()


def test_it_carries_its_record_and_not_the_optimizer() -> None:
    payload = verify_checkpoint(SHIPPED)  # readable, ours, its tensors match their digest, finite weights
    provenance = payload["provenance"]
    machine = {"device", "processor", "cores", "cpu_native_bf16", "torch", "python"}
    assert machine <= set(provenance["machine"])
    assert provenance["date"].startswith("2026-") and provenance["wall_seconds"] > 0
    assert payload["step"] == STEPS and payload["params"]["train"]["epochs"] * 600 == STEPS
    assert payload["params"]["train"]["action_dropout"] > 0  # guidance on the actions has something to use
    assert len(payload["data_fingerprint"]) == 64 and payload["history"] and payload["curve"]
    assert not {"optimizer", "scheduler", "rng"} & set(payload)


def test_it_dreams_digits_that_keep_their_ink() -> None:
    """On sequences of the default data's kind that it never saw (another seed), frame by frame under their
    true actions with the default sampler: the next frame keeps about the given frame's ink (an untrained
    model draws noise at every pixel: several times the ink)."""
    model, payload = load_model(SHIPPED)
    past = payload["params"]["train"]["past_frames"]
    data = from_params(DataConfig, num_sequences=4, seed=123)
    generated = generate_sequences(data, progress=False)
    tokens_config = from_params(TokensConfig)
    pixels = downsample(generated.frames, tokens_config.frame_size)  # (4, 20, 16, 16) in [0, 1]
    tokens = torch.from_numpy(quantize(pixels, tokens_config.levels))
    intensities = torch.tensor(payload["vocabulary"]["intensities"])
    steps = np.diff(generated.centers[np.arange(4), :, generated.ink.argmax(axis=1)], axis=1)  # ego digit
    actions = torch.from_numpy(steps / (data.canvas / 2)).float()  # (4, 19, 2), the pipeline's units
    settings = SamplerSettings(
        steps=8, temperature=1.0, guidance=0.0, choice_temperature=1000.0, action_guidance=1.0
    )
    ratios = []
    for index in range(4):
        given = torch.cat([actions[index, :1], actions[index]])[:past]  # frame 0 repeats frame 1's action
        dreamer = Dreamer(model, tokens[index, :past], given, keep=past)
        frame = dreamer.next_frame(actions[index, past - 1], settings, new_generator(index, "cpu"))
        ratios.append(float(intensities[frame].sum() / intensities[tokens[index, past - 1].long()].sum()))
    assert 0.6 < float(np.median(ratios)) < 1.6, ratios


@pytest.mark.slow
def test_an_arrow_held_five_frames_moves_its_digit_at_least_half_the_way(tmp_path: Path) -> None:
    """The playground's rollout (scripts/dream_rollout.py: here 40 frames, the context sliding, arrows held 5
    frames each, turning right, down, left, up) on generated sequences it never saw: the tracked ego digit
    moves along the held arrow at least half the commanded distance on average, and the dream keeps its
    digits (the last frame's ink within 0.3..3 of the given frames')."""
    split = {"train_sequences": 4, "val_sequences": 8, "test_sequences": 4, "sequences_per_shard": 8}
    data = from_params(DataConfig, num_sequences=16, seed=123, **split)
    build_raw_store(data, tmp_path / "raw.zarr", progress=False)
    build_frames_store(tmp_path / "raw.zarr", tmp_path / "frames.zarr", from_params(TokensConfig), 8)
    build_token_store(tmp_path / "frames.zarr", tmp_path / "tokens.zarr", 16, 8, train_sequences=4)
    build_actions_store(tmp_path / "raw.zarr", tmp_path / "actions.zarr", from_params(ActionsConfig), 16, 8)
    stores = ValidationData(
        tmp_path / "tokens.zarr", tmp_path / "frames.zarr", tmp_path / "actions.zarr", 4, 8, "mean"
    )
    world = load_world(SHIPPED, stores)
    settings = SamplerSettings.from_config(from_params(SampleConfig))
    arrows = rollout.commands(40, 5, stores.typical_step).astype(np.float32)  # each arrow held twice
    following, kept = [], []
    for sequence in range(4, 8):
        pixels = rollout.dream(world, sequence, arrows, settings, seed=sequence)
        following += rollout.arrow_following(stores.tracker, pixels, arrows, 5, world.past_frames)
        kept.append(pixels[-1].sum() / pixels[: world.past_frames].sum(axis=(1, 2)).mean())
    assert np.mean(following) >= 0.5, np.mean(following)
    assert 0.3 < np.median(kept) < 3, kept


@pytest.mark.slow
def test_play_and_evaluate_the_shipped_model_after_the_data_stages(tmp_path: Path) -> None:
    """A fresh clone, the data stages alone (`dvc repro actions`): they rebuild exactly the data the shipped
    model was trained on, the evaluate stage scores it on the test split, and `mnist-world play` dreams with
    it."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    (clone / "pretrained").mkdir(exist_ok=True)
    shutil.copy(SHIPPED, clone / "pretrained" / "world-model.pt")  # the working tree's, committed or not
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["eval"].update({"sequences": 8, "samples": 1, "strips": 1, "generations": 1})  # a short score
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(clone, "dvc", "repro", "actions")

    payload = verify_checkpoint(clone / "pretrained" / "world-model.pt")
    data, train = params["data"], payload["params"]["train"]
    sizes = (data["train_sequences"], data["val_sequences"])
    splits = [
        Sequences(*load_split(clone / "data/tokens.zarr", clone / "data/actions.zarr", split, *sizes, limit))
        for split, limit in (("train", train["max_train_sequences"]), ("val", train["max_val_sequences"]))
    ]
    assert data_fingerprint(*splits) == payload["data_fingerprint"]

    evaluate = ["python", "stages/evaluate.py", "--checkpoint", "pretrained/world-model.pt", "--no-progress"]
    run(clone, *evaluate, "--output", "reports/eval-pretrained")
    metrics = json.loads((clone / "reports/eval-pretrained/metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["sequences"] == 8
    assert metrics["point"]["mse_vs_blank"] < 0.8

    play = subprocess.Popen(
        [str(BIN / "mnist-world"), "play", "--checkpoint", "pretrained/world-model.pt", "--port=0"],
        cwd=clone, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = play.stdout.readline()
        assert line.startswith("mnist-world playground on http://127.0.0.1:"), line + play.stderr.read()
        url = line.split()[3].rstrip("/")
        start = post(url, "/api/restart", {"sequence": data["train_sequences"]})
        assert start["checkpoint"] == "pretrained/world-model.pt"
        body = {"session": start["session"], "frame": len(start["frames"]), "action": [0.1, 0.0]}
        frame = post(url, "/api/step", {**body, "temperature": 1.0, "truth": False})
        assert frame["frame"] == body["frame"] and not frame["given"] and frame["pixels"]
    finally:
        play.terminate()
        play.wait(timeout=10)


def post(base: str, path: str, body: dict) -> dict:
    import urllib.request

    request = urllib.request.Request(
        base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())
