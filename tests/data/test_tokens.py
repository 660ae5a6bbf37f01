"""Downsampling, uniform quantization, the vocabulary, and the frame and token stores with their
quantization floor."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import from_params, params_section
from skimage.transform import resize

from mnist_world.config import TokensConfig
from mnist_world.core.store import StoreError, create_store, open_array, write_sequences
from mnist_world.data.frames import area_weights, build_frames_store, downsample
from mnist_world.data.tokens import Vocabulary, build_token_store, quantize, token_attributes

ROOT = Path(__file__).resolve().parents[2]


def downsample_reference(frames: np.ndarray, size: int) -> np.ndarray:
    """skimage `resize(order=1)` frame by frame: the slow reference that `bilinear` reproduces."""
    lead = frames.shape[:-2]
    flat = frames.reshape(-1, *frames.shape[-2:])
    out = [
        resize(frame, (size, size), order=1, mode="edge", anti_aliasing=False).astype(np.float32)
        for frame in flat
    ]
    return np.stack(out).reshape(*lead, size, size)


def write_raw(path: Path, frames: np.ndarray, source: str = "file") -> None:
    attributes = {"source": source, "canvas": frames.shape[-1], "frames": frames.shape[1], "digits": 2}
    with create_store(path, attributes | {"has_ground_truth": False}) as group:
        write_sequences(group, "frames", frames, sequences_per_shard=2)


def test_area_downsampling_averages_each_block_exactly() -> None:
    frame = np.array(
        [[0, 255, 10, 20], [255, 0, 30, 40], [255, 255, 0, 0], [255, 255, 0, 51]], dtype=np.uint8
    )[None, None]  # (1, 1, 4, 4)
    out = downsample(frame, 2, "area")
    expected = np.array([[510 / 4, 100 / 4], [1020 / 4, 51 / 4]]) / 255
    assert out.dtype == np.float32 and out.shape == (1, 1, 2, 2)
    np.testing.assert_allclose(out[0, 0], expected, rtol=0, atol=1e-7)


def test_area_downsampling_with_a_fractional_factor_weights_partial_pixels() -> None:
    # 3 -> 2: output pixel 0 covers input pixel 0 fully and half of pixel 1.
    np.testing.assert_allclose(area_weights(3, 2), [[2 / 3, 1 / 3, 0], [0, 1 / 3, 2 / 3]])
    frame = np.arange(9, dtype=np.uint8).reshape(1, 3, 3) * 20
    out = downsample(frame, 2, "area")[0]
    x = frame[0].astype(np.float64) / 255
    corner = (x[0, 0] + x[0, 1] / 2 + x[1, 0] / 2 + x[1, 1] / 4) / (1.5 * 1.5)
    assert out[0, 0] == pytest.approx(corner, abs=1e-6)
    # A constant frame stays constant whatever the factor.
    flat = np.full((2, 3, 64, 64), 200, dtype=np.uint8)
    np.testing.assert_allclose(downsample(flat, 24, "area"), 200 / 255, atol=1e-6)


def test_bilinear_matches_scikit_image_resize() -> None:
    frames = np.random.default_rng(0).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)
    for size in (32, 24):
        np.testing.assert_allclose(
            downsample(frames, size, "bilinear"), downsample_reference(frames, size), atol=1e-6
        )
    with pytest.raises(ValueError, match="unknown downsample method 'cubic'"):
        downsample(frames, 32, "cubic")


def test_uniform_bins_give_every_level_an_equal_share() -> None:
    levels = 16
    x = (np.arange(160_000) + 0.5) / 160_000  # uniform over [0, 1]
    tokens = quantize(x, levels)
    assert tokens.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(tokens, minlength=levels), 10_000)
    assert quantize(np.array([0.0, 1 / 16, 0.5, 15 / 16, 1.0]), levels).tolist() == [0, 1, 8, 15, 15]
    # Decoding to the bin centre is at most half a bin from any value in the bin.
    centres = Vocabulary.uniform(levels, 1, 1)
    assert np.abs(centres.decode(tokens) - x).max() <= 0.5 / levels + 1e-7
    np.testing.assert_allclose(centres.decode(np.arange(levels)), (np.arange(levels) + 0.5) / levels)


def test_token_store_attributes_and_quantization_floor(tmp_path: Path) -> None:
    raw = np.random.default_rng(1).integers(0, 256, (5, 3, 8, 8), dtype=np.uint8)
    write_raw(tmp_path / "raw.zarr", raw, source="generate")
    config = from_params(TokensConfig, frame_size=4, levels=8, downsample="area")
    build_frames_store(tmp_path / "raw.zarr", tmp_path / "frames.zarr", config, 2, progress=False)
    floor = build_token_store(
        tmp_path / "frames.zarr", tmp_path / "tokens.zarr", 8, 2, train_sequences=3, progress=False
    )

    frames = open_array(tmp_path / "frames.zarr", "frames", ndim=4, dtype=np.float32)
    np.testing.assert_allclose(frames[:], raw.reshape(5, 3, 4, 2, 4, 2).mean(axis=(3, 5)) / 255, atol=1e-6)
    assert dict(frames_attributes(tmp_path / "frames.zarr")) == {
        "frame_size": 4,
        "method": "area",
        "canvas": 8,
        "frames": 3,
        "source": "generate",
        "range": [0.0, 1.0],
    }
    tokens = open_array(tmp_path / "tokens.zarr", "tokens", ndim=4, dtype=np.uint8)
    np.testing.assert_array_equal(tokens[:], np.minimum(np.floor(frames[:] * 8), 7))
    assert dict(frames_attributes(tmp_path / "tokens.zarr")) == {
        "levels": 8,
        "mask_id": 8,
        "vocab_size": 9,
        "frame_size": 4,
        "frames": 3,
        "source": "generate",
        "bin_means": floor["bin_means"],
    }
    # Each level's mean over the training split (the first 3 sequences) by hand; bin centres where empty.
    train_tokens, train_frames = tokens[:3].astype(np.int64), frames[:3].astype(np.float64)
    for level in range(8):
        inside = train_frames[train_tokens == level]
        expected = inside.mean() if inside.size else (level + 0.5) / 8
        assert floor["bin_means"][level] == pytest.approx(expected, rel=1e-9), level
    # The floor by hand under both decodings: decoded tokens against the continuous frames, every pixel.
    for rule, values in (("mean", np.array(floor["bin_means"])), ("centre", (np.arange(8) + 0.5) / 8)):
        mse = np.mean((values[tokens[:]] - frames[:]) ** 2)
        assert floor["quantization"][rule]["mse"] == pytest.approx(mse, rel=1e-6), rule
        assert floor["quantization"][rule]["psnr"] == pytest.approx(10 * np.log10(1 / mse), rel=1e-6)
    assert floor["quantization"]["mean"]["mse"] < floor["quantization"]["centre"]["mse"]
    assert floor["levels"] == 8 and floor["frame_size"] == 4 and floor["sequences"] == 5
    vocabulary = Vocabulary.from_store(tmp_path / "tokens.zarr")
    assert vocabulary.intensities == tuple(floor["bin_means"]) and vocabulary.mask_id == 8
    np.testing.assert_allclose(vocabulary.decode(tokens[:]), np.array(floor["bin_means"])[tokens[:]])
    assert Vocabulary.from_store(tmp_path / "tokens.zarr", "centre") == Vocabulary.uniform(8, 4, 3)


def test_a_store_without_bin_means_asks_for_a_rerun_or_the_centre_rule(tmp_path: Path) -> None:
    with create_store(tmp_path / "old.zarr", token_attributes(16, 8, 3, "generate")) as group:
        write_sequences(group, "tokens", np.zeros((2, 3, 8, 8), dtype=np.uint8), sequences_per_shard=2)
    with pytest.raises(
        StoreError, match="no 'bin_means' attribute.*dvc repro quantize.*tokens.decode=centre"
    ):
        Vocabulary.from_store(tmp_path / "old.zarr")
    assert Vocabulary.from_store(tmp_path / "old.zarr", "centre").decode_rule == "centre"


def frames_attributes(path: Path) -> dict:
    return json.loads((path / "zarr.json").read_text())["attributes"]


def test_stages_write_their_outputs_and_fail_in_one_line(tmp_path: Path) -> None:
    write_raw(tmp_path / "raw.zarr", np.full((4, 2, 8, 8), 128, dtype=np.uint8))
    params = tmp_path / "params.yaml"
    sections = {
        "data": params_section("data", sequences_per_shard=2, train_sequences=3, val_sequences=1),
        "tokens": params_section("tokens", frame_size=4, levels=16),
    }
    params.write_text(yaml.safe_dump(sections))
    run = [sys.executable, str(ROOT / "stages/downsample.py"), "--params", str(params), "--no-progress"]
    done = subprocess.run(
        [*run, "--raw", str(tmp_path / "raw.zarr"), "--output", str(tmp_path / "frames.zarr")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    quantize_stage = [
        sys.executable,
        str(ROOT / "stages/quantize.py"),
        "--params",
        str(params),
        "--no-progress",
    ]
    done = subprocess.run(
        [
            *quantize_stage,
            "--frames",
            str(tmp_path / "frames.zarr"),
            "--output",
            str(tmp_path / "tokens.zarr"),
            "--report",
            str(tmp_path / "quantize.json"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    floor = json.loads((tmp_path / "quantize.json").read_text())["quantization"]
    assert floor["centre"]["mse"] > 0 and floor["mean"]["mse"] < floor["centre"]["mse"]

    failed = subprocess.run(
        [*run, "--raw", str(tmp_path / "absent.zarr"), "--output", str(tmp_path / "out.zarr")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'absent.zarr'}: store not found (run the stage that produces it first)"
    ]
    assert not (tmp_path / "out.zarr").exists()
