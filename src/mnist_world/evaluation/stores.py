"""The validation inputs opened together: the token, frame and action stores checked against each other,
with the vocabulary the token store records and the tracker settings the action store records.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mnist_world.core.store import StoreError, open_array, open_store
from mnist_world.data.dataset import open_pair
from mnist_world.data.tokens import Vocabulary
from mnist_world.evaluation.action_following import Tracker


class ValidationStores:
    """The token, frame and action stores of one dataset, of matching shapes; tokens decode by `decode`."""

    def __init__(
        self, tokens_path: str | Path, frames_path: str | Path, actions_path: str | Path, decode: str
    ):
        self.tokens_path, self.actions_path = Path(tokens_path), Path(actions_path)
        self.tokens, self.actions = open_pair(tokens_path, actions_path)  # checked against each other
        self.frames = open_array(frames_path, "frames", ndim=4, dtype=np.float32)
        self.vocabulary = Vocabulary.from_store(tokens_path, decode)
        if self.frames.shape != self.tokens.shape:
            raise StoreError(
                f"{frames_path}: frames {self.frames.shape} do not match tokens {self.tokens.shape}"
            )
        try:
            self.tracker = Tracker.from_attributes(dict(open_store(actions_path).attrs))
        except (KeyError, TypeError, ValueError):
            raise StoreError(
                f"{actions_path}: no tracker settings (tracking.threshold, min_area, digits; canvas) in its "
                f"attributes: re-run `dvc repro actions`"
            ) from None
