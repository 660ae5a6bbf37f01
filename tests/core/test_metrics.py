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
