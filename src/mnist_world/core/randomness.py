"""Seeds and random states: one rule for deriving independent seeds, and the process's random state as
values a checkpoint can hold (loadable with `torch.load(weights_only=True)`).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def derived_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, stream, epoch, rank, sequence...): nearby keys give
    unrelated seeds, so no random stream depends on how much another consumed."""
    entropy = [key % 2**64 for key in keys]  # SeedSequence takes non-negative integers only
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def rng_state() -> dict[str, Any]:
    """This process's torch (CPU and current CUDA device), numpy and python random states."""
    numpy_name, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    python_version, python_internal, python_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "numpy": [
            numpy_name,
            torch.from_numpy(numpy_keys.astype(np.int64)),
            numpy_pos,
            numpy_has_gauss,
            numpy_gauss,
        ],
        "python": [python_version, list(python_internal), python_gauss],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
