"""Pixel metrics against hand-computed values, the baselines, and action following on sequences whose
answer is known (the true frames as the "prediction")."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from mnist_world import metrics
from mnist_world.actions import actions_from_centres, ego_centres
from mnist_world.config import DataConfig
from mnist_world.sources import generate_sequences
from mnist_world.tokens import dequantize, downsample, quantize


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(0)
    target = rng.random((2, 3, 8, 8)).astype(np.float32)
    prediction = np.clip(target + rng.normal(0, 0.1, target.shape), 0, 1).astype(np.float32)
    return prediction, target


def test_mse_psnr_and_the_per_frame_sum_match_numpy(pair):
    prediction, target = pair
    error = (prediction.astype(np.float64) - target) ** 2
    values = metrics.frame_metrics(prediction, target, ["mse", "mse_sum", "psnr"])
    np.testing.assert_allclose(values["mse"], error.mean(axis=(2, 3)))
    np.testing.assert_allclose(values["mse_sum"], error.sum(axis=(2, 3)))
    np.testing.assert_allclose(values["psnr"], 10 * np.log10(1 / error.mean(axis=(2, 3))))
    assert values["mse"].shape == (2, 3)


def test_ssim_matches_scikit_image_frame_by_frame(pair):
    prediction, target = pair
    expected = [
        [structural_similarity(prediction[n, f], target[n, f], data_range=1.0, win_size=7) for f in range(3)]
        for n in range(2)
    ]
    np.testing.assert_allclose(metrics.ssim(prediction, target), expected, atol=1e-6)
    single = metrics.ssim(prediction[:1, :1], target[:1, :1])
    np.testing.assert_allclose(single, [[expected[0][0]]], atol=1e-6)


def test_exact_frames_score_perfectly_without_infinities(pair):
    _, target = pair
    values = metrics.frame_metrics(target, target)
    assert np.all(values["mse"] == 0) and np.all(values["psnr"] == 100.0)
    np.testing.assert_allclose(values["ssim"], 1.0)


def test_the_dispatcher_rejects_unknown_metrics_and_mismatched_shapes(pair):
    prediction, target = pair
    with pytest.raises(ValueError, match="unknown metric 'lpips'"):
        metrics.frame_metrics(prediction, target, ["mse", "lpips"])
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.frame_metrics(prediction[:, :2], target)


def test_baselines_are_the_quantization_floor_the_last_frame_and_blank():
    rng = np.random.default_rng(1)
    frames = rng.random((2, 5, 8, 8)).astype(np.float32)
    tokens = quantize(frames, 16)
    answers = metrics.baselines(frames[:, :3], tokens[:, 3:], 16)
    np.testing.assert_array_equal(answers["quantization"], dequantize(tokens[:, 3:], 16))
    np.testing.assert_array_equal(answers["copy_last"], np.repeat(frames[:, 2:3], 2, axis=1))
    assert answers["blank"].shape == (2, 2, 8, 8) and not answers["blank"].any()
    # The quantization floor: at most half a bin from the truth.
    assert np.abs(answers["quantization"] - frames[:, 3:]).max() <= 0.5 / 16 + 1e-6


def test_summary_means_overall_and_per_horizon_and_the_comparison():
    per_frame = {
        "model": {"mse": np.array([[1.0, 3.0], [3.0, 5.0]]), "ssim": np.array([[0.9, 0.7], [0.9, 0.5]])},
        "copy_last": {"mse": np.array([[2.0, 4.0], [2.0, 8.0]]), "ssim": np.array([[0.8, 0.6], [0.8, 0.4]])},
    }
    overall, rows = metrics.summarize(per_frame)
    assert overall["model"] == {"mse": 3.0, "ssim": 0.75}
    assert rows == [
        {"horizon": 1, "model_mse": 2.0, "copy_last_mse": 2.0, "model_ssim": 0.9, "copy_last_ssim": 0.8},
        {"horizon": 2, "model_mse": 4.0, "copy_last_mse": 6.0, "model_ssim": 0.6, "copy_last_ssim": 0.5},
    ]
    comparison = metrics.versus(overall["model"], overall["copy_last"])
    assert comparison["mse_ratio"] == pytest.approx(0.75) and comparison["beats"] is True
    assert metrics.versus(overall["copy_last"], overall["model"])["beats"] is False


@pytest.fixture(scope="module")
def moving():
    """Generated sequences at the token resolution and their true ego actions, as the actions stage defines
    them: the ego digit's displacement from t - 1 to t divided by (W/2, H/2)."""
    data = DataConfig(num_sequences=24, seed=3)
    generated = generate_sequences(data, progress=False)
    frames = downsample(generated.frames, 32)  # (N, T, 32, 32)
    centres = ego_centres(generated.centers, generated.ink) * (32 / data.canvas)  # (N, T, 2) token pixels
    return frames, actions_from_centres(centres, 32)


def test_true_frames_follow_their_actions_and_not_the_mirrored_ones(moving):
    frames, actions = moving
    past = 10
    displacement, tracked = metrics.ego_displacements(frames, threshold=0.2, min_area=4, digits=2, canvas=64)
    assert displacement.shape == (24, 19, 2) and tracked.mean() > 0.8
    future = displacement[tracked, past - 1 :]
    factual = metrics.action_following(future, actions[tracked, past:], frame_size=32)
    # Whole-pixel tracking at 32x32 of a digit moving about 1.8 px per frame: within a pixel on average.
    assert factual["error_px"].mean() < 0.8
    assert factual["cosine"].mean() > 0.85 and factual["follows"].all()
    mirrored = metrics.action_following(future, metrics.mirror(actions, past)[tracked, past:], frame_size=32)
    assert mirrored["cosine"].mean() < -0.85 and not mirrored["follows"].any()
    assert mirrored["error_px"].mean() > 2 * factual["error_px"].mean()


def test_action_following_by_hand():
    displacement = np.array([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])  # (2, 2, 2) pixels
    actions = np.array([[[0.25, 0.0], [0.0, 0.25]], [[0.25, 0.0], [0.25, 0.0]]])  # x W/2 = 4: 1 px
    scores = metrics.action_following(displacement, actions, frame_size=8)
    np.testing.assert_allclose(scores["error_px"], [(0 + np.sqrt(2)) / 2, 1.0])
    np.testing.assert_allclose(scores["cosine"], [0.5, 0.0])  # (1*1 + 0) / (sqrt(2) * sqrt(2)); still: 0
    np.testing.assert_array_equal(scores["follows"], [True, False])
    np.testing.assert_array_equal(metrics.mirror(actions, 1)[:, 1], -actions[:, 1])
