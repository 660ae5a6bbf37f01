"""Action following on sequences whose answer is known (the true frames as the "prediction") and by hand."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import from_params

from mnist_world.actions.ego import actions_from_centres, ego_centres
from mnist_world.config import DataConfig
from mnist_world.data.frames import downsample
from mnist_world.data.sources import generate_sequences
from mnist_world.evaluation.action_following import (
    Tracker,
    action_following,
    ego_displacements,
    follow_actions,
    mirror,
    summarize_following,
)

TRACKER = Tracker(threshold=0.2, min_area=4, digits=2, canvas=64)


@pytest.fixture(scope="module")
def moving():
    """Generated sequences at the token resolution and their true ego actions, as the actions stage defines
    them: the ego digit's displacement from t - 1 to t divided by (W/2, H/2)."""
    data = from_params(DataConfig, num_sequences=24, seed=3)
    generated = generate_sequences(data, progress=False)
    frames = downsample(generated.frames, 32)  # (N, T, 32, 32)
    centres = ego_centres(generated.centers, generated.ink) * (32 / data.canvas)  # (N, T, 2) token pixels
    return frames, actions_from_centres(centres, 32)


def test_true_frames_follow_their_actions_and_not_the_mirrored_ones(moving):
    frames, actions = moving
    past = 10
    displacement, tracked, found = ego_displacements(frames, TRACKER, past)
    assert displacement.shape == (24, 19, 2) and tracked.mean() > 0.8
    assert found[tracked].mean() > 0.98  # the presence test keeps the true digit, crossings included
    future = displacement[tracked, past - 1 :]
    factual = action_following(future, actions[tracked, past:], frame_size=32)
    # Whole-pixel tracking at 32x32 of a digit moving about 1.8 px per frame: within a pixel on average.
    assert factual["error_px"].mean() < 0.8
    assert factual["cosine"].mean() > 0.85 and factual["follows"].all()
    mirrored = action_following(future, mirror(actions, past)[tracked, past:], frame_size=32)
    assert mirrored["cosine"].mean() < -0.85 and not mirrored["follows"].any()
    assert mirrored["error_px"].mean() > 2 * factual["error_px"].mean()


def test_action_following_by_hand():
    displacement = np.array([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])  # (2, 2, 2) pixels
    actions = np.array([[[0.25, 0.0], [0.0, 0.25]], [[0.25, 0.0], [0.25, 0.0]]])  # x W/2 = 4: 1 px
    scores = action_following(displacement, actions, frame_size=8)
    np.testing.assert_allclose(scores["error_px"], [(0 + np.sqrt(2)) / 2, 1.0])
    np.testing.assert_allclose(scores["cosine"], [0.5, 0.0])  # (1*1 + 0) / (sqrt(2) * sqrt(2)); still: 0
    np.testing.assert_array_equal(scores["follows"], [True, False])
    np.testing.assert_array_equal(mirror(actions, 1)[:, 1], -actions[:, 1])


def test_the_tracker_settings_come_from_the_action_store_attributes():
    attributes = {"canvas": 64, "tracking": {"threshold": 0.2, "min_area": 4, "size": 64, "digits": 2}}
    assert Tracker.from_attributes(attributes) == Tracker(threshold=0.2, min_area=4, digits=2, canvas=64)


def test_a_vanished_digit_is_a_miss_and_a_blank_future_scores_nothing(moving):
    """The ego digit erased from the future frames after the third: from there every frame is a miss (zero
    displacement), so the cosine is the one computed by hand on the first three displacements against the
    whole commanded trajectory, while the tracker, left to itself, would carry its prediction on and agree
    with the command."""
    frames, actions = moving
    past, kept = 10, 3
    truth = frames.astype(np.float64)
    vanished = truth.copy()
    vanished[:, past + kept :] = 0.0  # both digits gone: nothing left to find
    moves, tracked, found = ego_displacements(vanished, TRACKER, past)
    assert tracked.mean() > 0.8
    assert not found[:, past + kept :].any()
    assert np.all(moves[:, past + kept - 1 :] == 0)
    # Independently: the cosine of the kept displacements against the whole commanded trajectory.
    commanded = actions[:, past:].astype(np.float64) * 16  # (N, F, 2) pixels at 32x32
    kept_moves = moves[:, past - 1 : past - 1 + kept]
    dot = (kept_moves * commanded[:, :kept]).sum(axis=(1, 2))
    norms = np.linalg.norm(kept_moves, axis=(1, 2)) * np.linalg.norm(commanded, axis=(1, 2))
    expected = np.where(norms > 0, dot / np.where(norms > 0, norms, 1), 0)
    scores = follow_actions(truth, vanished[:, past:], truth[:, past:], actions, past, TRACKER)
    np.testing.assert_allclose(scores["model.cosine"], expected, atol=1e-12)
    np.testing.assert_allclose(scores["model.found"][tracked], kept / 10)
    summary = summarize_following(scores)["action_following"]
    assert summary["found"] == pytest.approx(kept / 10)
    assert summary["cosine"] < summary["ground_truth_cosine"] - 0.3
    assert summary["ground_truth_found"] > 0.98
    # A blank future, through the same code: never found, cosine 0, the error of standing still.
    assert (summary["blank_found"], summary["blank_cosine"], summary["blank_follows"]) == (0.0, 0.0, 0.0)
    standing = np.linalg.norm(commanded, axis=-1).mean(axis=1)  # (N,) every commanded step missed
    assert summary["blank_error_px"] == pytest.approx(standing[scores["blank.tracked"]].mean())


def test_a_faint_digit_is_not_found_a_dim_one_is():
    """The presence test by hand: a 7x7 box (28 px at a 64 canvas, 16x16 frames) at the tracked centre holds
    the digit's ink; below PRESENCE of its past ink the digit is missing."""
    frames = np.zeros((1, 4, 16, 16))
    for t in range(4):
        frames[0, t, 4:8, 2 + t : 5 + t] = 1.0  # a 4x3 block moving one pixel right per frame
    frames[0, 2] *= 0.6  # dim, but above the tracker's threshold: found
    frames[0, 3] *= 0.4  # kept by the tracker, but below half its ink: a miss
    tracker = Tracker(threshold=0.2, min_area=4, digits=1, canvas=64)
    moves, tracked, found = ego_displacements(frames, tracker, past=2)
    assert tracked.all()
    np.testing.assert_array_equal(found, [[True, True, True, False]])
    np.testing.assert_allclose(moves[0], [[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
