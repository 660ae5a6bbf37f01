"""Action following on sequences whose answer is known (the true frames as the "prediction") and by hand."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import from_params

from mnist_world.actions.ego import actions_from_centres, ego_centres
from mnist_world.config import DataConfig
from mnist_world.data.frames import downsample
from mnist_world.data.sources import generate_sequences
from mnist_world.evaluation.action_following import Tracker, action_following, ego_displacements, mirror


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
    displacement, tracked = ego_displacements(frames, Tracker(threshold=0.2, min_area=4, digits=2, canvas=64))
    assert displacement.shape == (24, 19, 2) and tracked.mean() > 0.8
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
