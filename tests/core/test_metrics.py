"""Pixel metrics against hand-computed values, the baselines and the tables of per-frame values."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from mnist_world.core import metrics
from mnist_world.data.tokens import Vocabulary, quantize


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
    vocabulary = Vocabulary.uniform(16, 8, 5)
    answers = metrics.baselines(frames[:, :3], tokens[:, 3:], vocabulary.decode)
    np.testing.assert_array_equal(answers["quantization"], (tokens[:, 3:] + 0.5) / 16)
    np.testing.assert_array_equal(answers["copy_last"], np.repeat(frames[:, 2:3], 2, axis=1))
    assert answers["blank"].shape == (2, 2, 8, 8) and not answers["blank"].any()
    # The quantization floor: at most half a bin from the truth.
    assert np.abs(answers["quantization"] - frames[:, 3:]).max() <= 0.5 / 16 + 1e-6


def test_tables_average_per_horizon_and_overall_in_method_order():
    scores = {
        "point": {"mse": np.array([[1.0, 3.0], [3.0, 5.0]]), "ssim": np.array([[0.9, 0.7], [0.9, 0.5]])},
        "blank": {"mse": np.array([[2.0, 4.0], [2.0, 8.0]]), "ssim": np.array([[0.8, 0.6], [0.8, 0.4]])},
    }
    table = metrics.frame_table(scores, first_sequence=10)
    assert len(table) == 8 and set(table["sequence"]) == {10, 11} and set(table["horizon"]) == {1, 2}
    row = table[(table["method"] == "blank") & (table["sequence"] == 11) & (table["horizon"] == 2)]
    assert row["mse"].item() == 8.0 and row["ssim"].item() == 0.4
    means = metrics.overall(table)
    assert list(means) == ["point", "blank"]
    assert means["point"] == pytest.approx({"mse": 3.0, "ssim": 0.75})
    assert means["blank"] == pytest.approx({"mse": 4.0, "ssim": 0.65})
    horizons = metrics.per_horizon(table)
    assert list(horizons.columns) == ["horizon", "point_mse", "blank_mse", "point_ssim", "blank_ssim"]
    expected = {
        "horizon": [1, 2],
        "point_mse": [2.0, 4.0],
        "blank_mse": [2.0, 6.0],
        "point_ssim": [0.9, 0.6],
        "blank_ssim": [0.8, 0.5],
    }
    for column, values in expected.items():
        np.testing.assert_allclose(horizons[column], values, err_msg=column)


def test_ink_iou_of_a_shifted_copy_is_the_known_overlap():
    """A 4x4 square of ink shifted one pixel right: 12 pixels shared of 20 covered, IoU 0.6; ink below the
    0.3 threshold is no ink; two empty frames agree (1)."""
    target = np.zeros((1, 4, 8, 8))
    target[0, :, 2:6, 2:6] = 0.8
    prediction = np.roll(target, 1, axis=-1)
    prediction[0, 1] = 0.25 * (target[0, 1] > 0)  # the right place, but too faint to count as ink
    prediction[0, 2] = target[0, 2]
    prediction[0, 3] = 0.0
    target[0, 3] = 0.0
    np.testing.assert_allclose(metrics.iou(prediction, target), [[12 / 20, 0.0, 1.0, 1.0]])


def test_ink_ratio_is_a_ratio_of_sums_over_sequences():
    """Two sequences, one frame: a dream with half the ink of a heavy frame and all of a light one keeps
    (0.5 * 40 + 10) / (40 + 10) = 0.6 of the ink, not the mean of the ratios (0.75)."""
    target = np.zeros((2, 1, 8, 8))
    target[0, 0, :5, :8] = 1.0  # 40
    target[1, 0, :2, :5] = 1.0  # 10
    prediction = target.copy()
    prediction[0] *= 0.5
    values = metrics.frame_metrics(prediction, target, ["ink", "true_ink", "iou"])
    np.testing.assert_allclose(values["ink"], [[20.0], [10.0]])
    table = metrics.frame_table({"dream": values})
    assert metrics.overall(table)["dream"]["ink_ratio"] == pytest.approx(0.6)
    horizons = metrics.per_horizon(table)
    assert list(horizons.columns) == ["horizon", "dream_iou", "dream_ink_ratio"]
    assert horizons["dream_ink_ratio"].item() == pytest.approx(0.6)


def test_blurred_last_grows_with_the_horizon_and_its_scale_is_fitted():
    """The blur of a point of ink by sigma = scale * h is the sampled Gaussian (zero outside the frame);
    frames that really do blur the last one at scale 0.5 are fitted back to 0.5."""
    past = np.zeros((1, 2, 33, 33))
    past[0, -1, 16, 16] = 1.0
    blurred = metrics.blurred_last(past, 3, scale=0.5)
    assert blurred.shape == (1, 3, 33, 33)
    for horizon in (1, 2, 3):
        sigma = 0.5 * horizon
        profile = np.exp(-0.5 * (np.arange(-16, 17) / sigma) ** 2)
        profile /= profile.sum()
        np.testing.assert_allclose(blurred[0, horizon - 1], np.outer(profile, profile), atol=1e-5)  # 4 sigma
    rng = np.random.default_rng(2)
    frames = np.zeros((6, 5, 16, 16))
    frames[:, 1] = rng.random((6, 16, 16)) > 0.8
    frames[:, 2:] = metrics.blurred_last(frames[:, :2], 3, scale=0.5)
    assert metrics.fit_blur_scale(frames, past=2) == pytest.approx(0.5)
    answers = metrics.baselines(frames[:, :2], np.zeros((6, 3, 16, 16), np.uint8), lambda t: t, 0.5)
    np.testing.assert_array_equal(answers["blurred_last"], frames[:, 2:].astype(np.float32))
